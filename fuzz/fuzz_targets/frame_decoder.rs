//! Every way the comet decodes client bytes: one WebSocket message, an op 9 batch, and a TCP
//! byte stream fed in arbitrary chunks. None may panic; whatever decodes must re-encode to the
//! same bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rim_proto::frame::{Frame, FrameCodec};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let max_body = 4096;
    if let Ok(f) = Frame::decode_message(Bytes::copy_from_slice(data), max_body) {
        assert_eq!(&f.to_bytes()[..], data, "a decoded message re-encodes to itself");
    }
    let _ = Frame::split_batch(Bytes::copy_from_slice(data), max_body);

    // The first byte picks a chunk size, as TCP reads would split the stream.
    let (chunk, stream) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut codec = FrameCodec::new(max_body);
    let mut buf = BytesMut::new();
    let mut decoded = BytesMut::new();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => f.encode(&mut decoded),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    if let Ok(Some(f)) = codec.decode_eof(&mut buf) {
        f.encode(&mut decoded);
    }
    assert!(stream.starts_with(&decoded), "decoded frames are a prefix of the stream");
});
