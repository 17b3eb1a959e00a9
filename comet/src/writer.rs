//! What goes out to clients, encoded once and shared: pushes and batches ([`EncodedPush`],
//! [`EncodedBatch`]), the items of a session's queue ([`Out`]), and their shape on each
//! transport (plain frames on TCP, op 9 wrapped pushes on WebSocket, JSON text in JSON mode).
//! Sessions that asked for push ids (Auth `recover`) get the tagged shapes of `tagged`.
//!
//! A queue item is never split or merged with another [`Out::Batch`]: a batch (a run of room
//! pushes delivered together) is exactly one WebSocket message, so clients see the grouping job
//! chose and every member shares the same encoded bytes.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::Utf8Bytes;
use bytes::{Bytes, BytesMut};
use rim_proto::frame::{Frame, HEADER_LEN, wrap_raw};
use rim_proto::history::{HistoryId, Source};
use rim_proto::json::encode_server;
use rim_proto::msg::DisconnectBody;
use rim_proto::op;

use crate::tagged::Tag;

/// A push encoded once per delivery and shared (by `Arc`) by every recipient's queue.
#[derive(Debug)]
pub struct EncodedPush {
    /// Op of the push.
    pub op: i32,
    /// The whole plain frame (header + body), as TCP clients get it.
    pub frame: Bytes,
    json: OnceLock<String>,
    ws_single: OnceLock<Bytes>,
    /// Its id and history, for sessions that asked for them (recorded pushes only).
    tag: Option<Box<Tag>>,
}

impl EncodedPush {
    /// Encodes a push frame (seq 0) once.
    pub fn new(op: i32, body: &[u8]) -> Self {
        EncodedPush {
            op,
            frame: Frame::new(op, 0, Bytes::copy_from_slice(body)).to_bytes(),
            json: OnceLock::new(),
            ws_single: OnceLock::new(),
            tag: None,
        }
    }

    /// The push's body.
    pub fn body(&self) -> &[u8] {
        self.frame.get(HEADER_LEN..).unwrap_or_default()
    }

    /// JSON-mode text `{"op":..,"seq":0,"body":..}`, built on first use and then shared.
    pub fn json_text(&self) -> &str {
        self.json.get_or_init(|| {
            let mut s = String::with_capacity(self.frame.len() + 32);
            encode_server(&mut s, self.op, 0, self.body());
            s
        })
    }

    /// The op 9 message carrying only this push, built on first use and then shared.
    pub fn ws_single(&self) -> Bytes {
        self.ws_single.get_or_init(|| wrap_raw(&self.frame)).clone()
    }

    /// The same push, recorded as `id` in `source`'s history (tagged for sessions that ask).
    pub fn with_tag(mut self, id: HistoryId, source: Source) -> Self {
        self.tag = Some(Box::new(Tag::new(id, source)));
        self
    }

    /// Binary shape for a tagged session: the PushMeta frame, then the push frame (the plain
    /// frame alone when the push is recorded nowhere).
    pub fn tagged_frames(&self) -> Bytes {
        match &self.tag {
            Some(tag) => tag.frames(&self.frame),
            None => self.frame.clone(),
        }
    }

    /// JSON shape for a tagged session: the push object with `"id"` and its history.
    pub fn tagged_json(&self) -> &str {
        match &self.tag {
            Some(tag) => tag.json(self.json_text()),
            None => self.json_text(),
        }
    }
}

/// Several pushes that go out as one unit: one op 9 WebSocket message, one JSON array, or the
/// frames back to back in one TCP write. Each encoding is built on first use and then shared by
/// every session holding the batch (the writer tasks of a room's members).
#[derive(Debug)]
pub struct EncodedBatch {
    pushes: Vec<Arc<EncodedPush>>,
    frames: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
    // Kept as the WebSocket text payload type itself so members share one allocation.
    json: OnceLock<Utf8Bytes>,
}

impl EncodedBatch {
    /// A batch of `pushes`, in order (encodings are built lazily, once).
    pub fn new(pushes: Vec<Arc<EncodedPush>>) -> Self {
        EncodedBatch {
            pushes,
            frames: OnceLock::new(),
            ws: OnceLock::new(),
            json: OnceLock::new(),
        }
    }

    /// The pushes, in order.
    pub fn pushes(&self) -> &[Arc<EncodedPush>] {
        &self.pushes
    }

    /// Number of pushes.
    pub fn len(&self) -> usize {
        self.pushes.len()
    }

    /// Whether the batch holds no push.
    pub fn is_empty(&self) -> bool {
        self.pushes.is_empty()
    }

    /// Every push's plain frame back to back (TCP, and the body of the op 9 message).
    pub fn frames(&self) -> Bytes {
        self.frames
            .get_or_init(|| {
                let mut b =
                    BytesMut::with_capacity(self.pushes.iter().map(|p| p.frame.len()).sum());
                for p in &self.pushes {
                    b.extend_from_slice(&p.frame);
                }
                b.freeze()
            })
            .clone()
    }

    /// The op 9 message wrapping every push frame.
    pub fn ws(&self) -> Bytes {
        self.ws.get_or_init(|| wrap_raw(&self.frames())).clone()
    }

    /// JSON-mode text: an array of the pushes' objects (a cheap clone of shared bytes).
    pub fn json_text(&self) -> Utf8Bytes {
        self.json
            .get_or_init(|| Utf8Bytes::from(json_array(self.pushes.iter().map(|p| p.json_text()))))
            .clone()
    }
}

/// One item of a session's outbound queue.
#[derive(Debug, Clone)]
pub enum Out {
    /// A reply to a client frame (op 3, 5, 8, 13, 15, 17): written as a plain frame.
    Reply(Frame),
    /// A push shared with other sessions.
    Push(Arc<EncodedPush>),
    /// Several pushes written as one message (a run of room pushes), possibly shared.
    Batch(Arc<EncodedBatch>),
    /// [`Out::Push`] for a session that asked for push ids: written in its tagged shape.
    Tagged(Arc<EncodedPush>),
    /// [`Out::Batch`] in its tagged shape.
    TaggedBatch(Arc<EncodedBatch>),
}

impl Out {
    /// `p` as a queue item for a session that does (`tagged`) or does not want push ids.
    pub fn push(p: Arc<EncodedPush>, tagged: bool) -> Out {
        if tagged { Out::Tagged(p) } else { Out::Push(p) }
    }

    /// `b` as a queue item, like [`Out::push`].
    pub fn batch(b: Arc<EncodedBatch>, tagged: bool) -> Out {
        if tagged {
            Out::TaggedBatch(b)
        } else {
            Out::Batch(b)
        }
    }
}

/// TCP: every item as a plain frame, all in one buffer (one write, one flush).
pub fn tcp_bytes(batch: &[Out]) -> Bytes {
    let mut b = BytesMut::new();
    for o in batch {
        match o {
            Out::Reply(f) => f.encode(&mut b),
            Out::Push(p) => b.extend_from_slice(&p.frame),
            Out::Batch(batch) => b.extend_from_slice(&batch.frames()),
            Out::Tagged(p) => b.extend_from_slice(&p.tagged_frames()),
            Out::TaggedBatch(batch) => {
                for p in batch.pushes() {
                    b.extend_from_slice(&p.tagged_frames());
                }
            }
        }
    }
    b.freeze()
}

/// WebSocket binary mode: each reply its own message; each run of consecutive single pushes one
/// op 9 message; each batch exactly one op 9 message of its own (never merged or split).
pub fn ws_binary_messages(batch: &[Out]) -> Vec<Bytes> {
    let mut msgs = Vec::new();
    // (push, tagged)
    let mut run: Vec<(&Arc<EncodedPush>, bool)> = Vec::new();
    let flush = |run: &mut Vec<(&Arc<EncodedPush>, bool)>, msgs: &mut Vec<Bytes>| match run
        .as_slice()
    {
        [] => {}
        [(p, false)] => {
            msgs.push(p.ws_single());
            run.clear();
        }
        _ => {
            let mut inner = BytesMut::with_capacity(run.iter().map(|(p, _)| p.frame.len()).sum());
            for (p, tagged) in run.iter() {
                if *tagged {
                    inner.extend_from_slice(&p.tagged_frames());
                } else {
                    inner.extend_from_slice(&p.frame);
                }
            }
            msgs.push(wrap_raw(&inner));
            run.clear();
        }
    };
    for o in batch {
        match o {
            Out::Push(p) => run.push((p, false)),
            Out::Tagged(p) => run.push((p, true)),
            Out::TaggedBatch(b) => {
                flush(&mut run, &mut msgs);
                let mut inner = BytesMut::new();
                for p in b.pushes() {
                    inner.extend_from_slice(&p.tagged_frames());
                }
                msgs.push(wrap_raw(&inner));
            }
            Out::Reply(f) => {
                flush(&mut run, &mut msgs);
                msgs.push(f.to_bytes());
            }
            Out::Batch(b) => {
                flush(&mut run, &mut msgs);
                msgs.push(b.ws());
            }
        }
    }
    flush(&mut run, &mut msgs);
    msgs
}

/// JSON text of a reply; heartbeat replies carry `{"online":N}` instead of the 4-byte count.
pub fn reply_json(f: &Frame) -> String {
    let mut s = String::new();
    if f.op == op::HEARTBEAT_REPLY {
        let n = <[u8; 4]>::try_from(&f.body[..]).map_or(0, i32::from_be_bytes);
        encode_server(
            &mut s,
            f.op,
            f.seq,
            format!("{{\"online\":{n}}}").as_bytes(),
        );
    } else {
        encode_server(&mut s, f.op, f.seq, &f.body);
    }
    s
}

/// WebSocket JSON mode: each reply one object; each run of single pushes one object or an array;
/// each batch exactly one array of its own.
pub fn ws_json_messages(batch: &[Out]) -> Vec<Utf8Bytes> {
    let mut msgs = Vec::new();
    // The object of each push of the current run of single pushes.
    let mut run: Vec<&str> = Vec::new();
    let flush = |run: &mut Vec<&str>, msgs: &mut Vec<Utf8Bytes>| match run.as_slice() {
        [] => {}
        [one] => {
            msgs.push((*one).into());
            run.clear();
        }
        _ => {
            msgs.push(json_array(run.iter().copied()).into());
            run.clear();
        }
    };
    for o in batch {
        match o {
            Out::Push(p) => run.push(p.json_text()),
            Out::Tagged(p) => run.push(p.tagged_json()),
            Out::TaggedBatch(b) => {
                flush(&mut run, &mut msgs);
                msgs.push(json_array(b.pushes().iter().map(|p| p.tagged_json())).into());
            }
            Out::Reply(f) => {
                flush(&mut run, &mut msgs);
                msgs.push(reply_json(f).into());
            }
            Out::Batch(b) => {
                flush(&mut run, &mut msgs);
                msgs.push(b.json_text());
            }
        }
    }
    flush(&mut run, &mut msgs);
    msgs
}

/// `[a,b,...]` of JSON objects.
fn json_array<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut s = String::from("[");
    for (i, item) in items.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(item);
    }
    s.push(']');
    s
}

/// The op 6 DisconnectReply carrying `reason`, as a plain frame.
pub fn disconnect_frame(reason: &str) -> Frame {
    Frame::new(op::DISCONNECT_REPLY, 0, DisconnectBody::to_json(reason))
}

/// A WebSocket close reason must fit in 123 bytes; cut at a char boundary.
pub fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn push_is_encoded_once_and_shared() {
        let p = Arc::new(EncodedPush::new(1000, br#"{"a":1}"#));
        assert_eq!(p.body(), br#"{"a":1}"#);
        let a = p.json_text().as_ptr();
        let b = p.json_text().as_ptr();
        assert_eq!(a, b, "JSON text built once");
        assert_eq!(p.json_text(), r#"{"op":1000,"seq":0,"body":{"a":1}}"#);
        // Bytes clones share the allocation.
        assert_eq!(p.ws_single().as_ptr(), p.ws_single().as_ptr());
        let out1 = Out::Push(p.clone());
        let Out::Push(q) = out1.clone() else {
            unreachable!()
        };
        assert_eq!(q.frame.as_ptr(), p.frame.as_ptr());
    }

    #[test]
    fn ws_batches_wrap_pushes_in_op9_and_keep_replies_plain() {
        let p1 = Arc::new(EncodedPush::new(1000, b"one"));
        let p2 = Arc::new(EncodedPush::new(1001, b"two"));
        let reply = Frame::new(op::HEARTBEAT_REPLY, 7, 5i32.to_be_bytes().to_vec());
        let batch = vec![
            Out::Push(p1.clone()),
            Out::Push(p2.clone()),
            Out::Reply(reply.clone()),
            Out::Push(p1.clone()),
        ];
        let msgs = ws_binary_messages(&batch);
        assert_eq!(msgs.len(), 3);
        let raw = Frame::decode_message(msgs[0].clone(), 1 << 20).unwrap();
        assert_eq!(raw.op, op::RAW);
        let inner = Frame::split_batch(raw.body, 1 << 20).unwrap();
        assert_eq!(
            inner
                .iter()
                .map(|f| (f.op, &f.body[..]))
                .collect::<Vec<_>>(),
            vec![(1000, &b"one"[..]), (1001, &b"two"[..])]
        );
        assert_eq!(Frame::decode_message(msgs[1].clone(), 64).unwrap(), reply);
        let single = Frame::decode_message(msgs[2].clone(), 1 << 20).unwrap();
        assert_eq!(single.op, op::RAW);

        let tcp = tcp_bytes(&batch);
        let mut codec = rim_proto::FrameCodec::new(1 << 20);
        let mut buf = BytesMut::from(&tcp[..]);
        let mut ops = Vec::new();
        while let Some(f) = tokio_util::codec::Decoder::decode(&mut codec, &mut buf).unwrap() {
            ops.push(f.op);
        }
        assert_eq!(ops, vec![1000, 1001, 3, 1000]);
    }

    #[test]
    fn json_batches_are_arrays_and_heartbeat_says_online() {
        let p1 = Arc::new(EncodedPush::new(1000, br#"{"x":1}"#));
        let p2 = Arc::new(EncodedPush::new(1000, b"plain"));
        let reply = Frame::new(op::HEARTBEAT_REPLY, 2, 9i32.to_be_bytes().to_vec());
        let msgs = ws_json_messages(&[Out::Reply(reply), Out::Push(p1), Out::Push(p2)]);
        assert_eq!(msgs[0], r#"{"op":3,"seq":2,"body":{"online":9}}"#);
        let v: serde_json::Value = serde_json::from_str(&msgs[1]).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"op":1000,"seq":0,"body":{"x":1}},{"op":1000,"seq":0,"body":"plain"}])
        );
    }

    #[test]
    fn a_batch_is_exactly_one_message_never_merged_with_neighbours() {
        let p1 = Arc::new(EncodedPush::new(1000, b"a"));
        let p2 = Arc::new(EncodedPush::new(1000, b"b"));
        let p3 = Arc::new(EncodedPush::new(1000, b"c"));
        let batch = Arc::new(EncodedBatch::new(vec![p2.clone(), p3.clone()]));
        let items = vec![
            Out::Push(p1.clone()),
            Out::Batch(batch.clone()),
            Out::Push(p1.clone()),
        ];
        let msgs = ws_binary_messages(&items);
        assert_eq!(msgs.len(), 3, "single, batch, single");
        assert_eq!(
            msgs[1].as_ptr(),
            batch.ws().as_ptr(),
            "shared bytes, not re-wrapped"
        );
        let raw = Frame::decode_message(msgs[1].clone(), 1 << 20).unwrap();
        let inner = Frame::split_batch(raw.body, 1 << 20).unwrap();
        assert_eq!(
            inner.iter().map(|f| &f.body[..]).collect::<Vec<_>>(),
            vec![&b"b"[..], &b"c"[..]]
        );

        let json = ws_json_messages(&items);
        assert_eq!(json.len(), 3);
        assert_eq!(
            json[1],
            r#"[{"op":1000,"seq":0,"body":"b"},{"op":1000,"seq":0,"body":"c"}]"#
        );
        assert_eq!(json[1].as_ptr(), batch.json_text().as_ptr(), "shared text");

        let tcp = tcp_bytes(&items);
        let want: Vec<u8> = [&p1.frame, &p2.frame, &p3.frame, &p1.frame]
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect();
        assert_eq!(&tcp[..], &want[..]);
    }

    #[test]
    fn close_reasons_fit_websocket_limit() {
        let long = "é".repeat(100);
        let r = close_reason(&long);
        assert!(r.len() <= 123);
        assert!(long.starts_with(&r));
    }
}
