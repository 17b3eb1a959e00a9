//! The goim binary frame: a 16-byte big-endian header and a body.
//!
//! ```text
//! 0        4          6      8      12     16
//! | packLen | headerLen | ver | op    | seq  | body (packLen - 16 bytes)
//! ```
//!
//! [`Frame::decode_message`] validates one WebSocket message (exactly one frame);
//! [`FrameCodec`] decodes frames incrementally from a TCP byte stream.
//! Decoding never panics: every malformed input maps to a [`FrameError`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Default limit for the body of a frame read from a client (protocol.md).
pub const DEFAULT_MAX_BODY: usize = 4096;
/// Protocol version rim writes.
pub const VERSION: i16 = 1;

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Protocol version (clients send 1; 0 is accepted).
    pub ver: i16,
    /// Operation, see [`crate::op`].
    pub op: i32,
    /// Client-chosen sequence number; replies echo it.
    pub seq: i32,
    /// Payload.
    pub body: Bytes,
}

/// Why a frame was rejected. Each maps to a WebSocket close code via [`FrameError::ws_close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than 16 bytes where a whole frame was expected.
    #[error("short frame: {len} bytes, header needs 16")]
    ShortHeader {
        /// Bytes available.
        len: usize,
    },
    /// headerLen is not 16.
    #[error("headerLen is {0}, must be 16")]
    BadHeaderLen(i16),
    /// packLen smaller than the header.
    #[error("packLen {0} is smaller than the 16-byte header")]
    PackLenTooSmall(i32),
    /// Body over the configured limit.
    #[error("body of {body_len} bytes exceeds the limit of {max} bytes")]
    TooBig {
        /// Declared body length.
        body_len: usize,
        /// Configured limit.
        max: usize,
    },
    /// packLen disagrees with the length of the WebSocket message holding the frame.
    #[error("packLen {pack_len} does not match the message length {actual}")]
    LengthMismatch {
        /// Declared packLen.
        pack_len: usize,
        /// Bytes in the message.
        actual: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame.
        buffered: usize,
    },
}

impl FrameError {
    /// WebSocket close code for this error: 1009 (message too big) or 1002 (protocol error).
    pub fn ws_close_code(&self) -> u16 {
        match self {
            FrameError::TooBig { .. } => 1009,
            _ => 1002,
        }
    }
}

/// A frame header, parsed and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    pack_len: usize,
    ver: i16,
    op: i32,
    seq: i32,
}

fn parse_header(buf: &[u8], max_body: usize) -> Result<Header, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::ShortHeader { len: buf.len() });
    }
    let mut h = &buf[..HEADER_LEN];
    let pack_len = h.get_i32();
    let header_len = h.get_i16();
    let ver = h.get_i16();
    let op = h.get_i32();
    let seq = h.get_i32();
    if header_len != HEADER_LEN as i16 {
        return Err(FrameError::BadHeaderLen(header_len));
    }
    if pack_len < HEADER_LEN as i32 {
        return Err(FrameError::PackLenTooSmall(pack_len));
    }
    // pack_len >= 16 here, so the cast is lossless.
    let body_len = pack_len as usize - HEADER_LEN;
    if body_len > max_body {
        return Err(FrameError::TooBig {
            body_len,
            max: max_body,
        });
    }
    Ok(Header {
        pack_len: pack_len as usize,
        ver,
        op,
        seq,
    })
}

impl Frame {
    /// A version-1 frame.
    pub fn new(op: i32, seq: i32, body: impl Into<Bytes>) -> Self {
        Frame {
            ver: VERSION,
            op,
            seq,
            body: body.into(),
        }
    }

    /// Encoded length (header + body).
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        put_header(dst, self.encoded_len(), self.ver, self.op, self.seq);
        dst.extend_from_slice(&self.body);
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }

    /// Decodes a buffer that must hold exactly one frame (one WebSocket message).
    pub fn decode_message(msg: Bytes, max_body: usize) -> Result<Frame, FrameError> {
        let h = parse_header(&msg, max_body)?;
        if h.pack_len != msg.len() {
            return Err(FrameError::LengthMismatch {
                pack_len: h.pack_len,
                actual: msg.len(),
            });
        }
        Ok(Frame {
            ver: h.ver,
            op: h.op,
            seq: h.seq,
            body: msg.slice(HEADER_LEN..),
        })
    }

    /// Splits the body of an op 9 (Raw) frame into the frames it carries.
    /// Server-written frames are trusted up to `max_body` per frame.
    pub fn split_batch(mut body: Bytes, max_body: usize) -> Result<Vec<Frame>, FrameError> {
        let mut out = Vec::new();
        while !body.is_empty() {
            let h = parse_header(&body, max_body)?;
            if h.pack_len > body.len() {
                return Err(FrameError::Truncated {
                    buffered: body.len(),
                });
            }
            let mut whole = body.split_to(h.pack_len);
            whole.advance(HEADER_LEN);
            out.push(Frame {
                ver: h.ver,
                op: h.op,
                seq: h.seq,
                body: whole,
            });
        }
        Ok(out)
    }
}

/// Writes a frame header for a frame of `pack_len` total bytes.
pub fn put_header(dst: &mut BytesMut, pack_len: usize, ver: i16, op: i32, seq: i32) {
    dst.reserve(pack_len.min(HEADER_LEN + 64 * 1024));
    // Frames are bounded far below 2 GiB by every limit rim has; saturate rather than wrap.
    dst.put_i32(i32::try_from(pack_len).unwrap_or(i32::MAX));
    dst.put_i16(HEADER_LEN as i16);
    dst.put_i16(ver);
    dst.put_i32(op);
    dst.put_i32(seq);
}

/// Wraps already-encoded frames (concatenated) in one op 9 frame, as written to WebSocket clients.
pub fn wrap_raw(frames: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + frames.len());
    put_header(
        &mut b,
        HEADER_LEN + frames.len(),
        VERSION,
        crate::op::RAW,
        0,
    );
    b.extend_from_slice(frames);
    b.freeze()
}

/// Incremental decoder/encoder for frames on a byte stream (TCP).
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_body: usize,
}

impl FrameCodec {
    /// A codec that rejects bodies longer than `max_body`.
    pub fn new(max_body: usize) -> Self {
        FrameCodec { max_body }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_BODY)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        if src.len() < HEADER_LEN {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        }
        let h = parse_header(src, self.max_body)?;
        if src.len() < h.pack_len {
            src.reserve(h.pack_len - src.len());
            return Ok(None);
        }
        let mut whole = src.split_to(h.pack_len);
        whole.advance(HEADER_LEN);
        Ok(Some(Frame {
            ver: h.ver,
            op: h.op,
            seq: h.seq,
            body: whole.freeze(),
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }
            .into()),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        item.encode(dst);
        Ok(())
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = CodecError;

    /// Pre-encoded frames (shared push buffers) go out as they are.
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), CodecError> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// Error of [`FrameCodec`]: a malformed frame or an I/O failure.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The peer sent a malformed frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_frame(max_body: usize) -> impl Strategy<Value = Frame> {
        (
            any::<i16>(),
            any::<i32>(),
            any::<i32>(),
            proptest::collection::vec(any::<u8>(), 0..=max_body),
        )
            .prop_map(|(ver, op, seq, body)| Frame {
                ver,
                op,
                seq,
                body: body.into(),
            })
    }

    proptest! {
        #[test]
        fn message_roundtrip(f in arb_frame(512)) {
            prop_assert_eq!(Frame::decode_message(f.to_bytes(), 512), Ok(f));
        }

        #[test]
        fn stream_roundtrip_any_split(frames in proptest::collection::vec(arb_frame(300), 1..8), cut in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            for f in &frames { f.encode(&mut wire); }
            let wire = wire.freeze();
            let cut = cut.index(wire.len() + 1);
            let mut codec = FrameCodec::new(300);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = codec.decode(&mut buf).unwrap() { got.push(f); }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = codec.decode_eof(&mut buf).unwrap() { got.push(f); }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn batch_roundtrip(frames in proptest::collection::vec(arb_frame(100), 0..8)) {
            let mut wire = BytesMut::new();
            for f in &frames { f.encode(&mut wire); }
            let raw = Frame::decode_message(wrap_raw(&wire), 1 << 20).unwrap();
            prop_assert_eq!(raw.op, crate::op::RAW);
            prop_assert_eq!(Frame::split_batch(raw.body, 100).unwrap(), frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode_message(Bytes::from(bytes.clone()), 64);
            let _ = Frame::split_batch(Bytes::from(bytes.clone()), 64);
            let mut codec = FrameCodec::new(64);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = codec.decode_eof(&mut buf) {}
        }
    }

    fn header(pack_len: i32, header_len: i16) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32(pack_len);
        b.put_i16(header_len);
        b.put_i16(1);
        b.put_i32(7);
        b.put_i32(1);
        b
    }

    #[test]
    fn rejects_each_malformation_precisely() {
        assert_eq!(
            Frame::decode_message(Bytes::from_static(&[0; 5]), 4096),
            Err(FrameError::ShortHeader { len: 5 })
        );
        assert_eq!(
            Frame::decode_message(header(16, 12).freeze(), 4096),
            Err(FrameError::BadHeaderLen(12))
        );
        assert_eq!(
            Frame::decode_message(header(3, 16).freeze(), 4096),
            Err(FrameError::PackLenTooSmall(3))
        );
        let big = Frame::decode_message(header(16 + 5000, 16).freeze(), 4096).unwrap_err();
        assert_eq!(
            big,
            FrameError::TooBig {
                body_len: 5000,
                max: 4096
            }
        );
        assert_eq!(big.ws_close_code(), 1009);
        let mut short = header(20, 16);
        short.put_u8(1);
        assert_eq!(
            Frame::decode_message(short.freeze(), 4096),
            Err(FrameError::LengthMismatch {
                pack_len: 20,
                actual: 17
            })
        );
        let mut codec = FrameCodec::default();
        let mut truncated = header(20, 16);
        truncated.put_u8(1);
        assert!(matches!(
            codec.decode_eof(&mut truncated),
            Err(CodecError::Frame(FrameError::Truncated { buffered: 17 }))
        ));
    }

    #[test]
    fn negative_pack_len_is_rejected_not_wrapped() {
        assert_eq!(
            Frame::decode_message(header(-1, 16).freeze(), 4096),
            Err(FrameError::PackLenTooSmall(-1))
        );
    }
}
