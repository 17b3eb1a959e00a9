//! Push ids for sessions that asked for them (Auth `recover`): a recorded push carries its id in
//! its history and that history (a room, or the user), so the client can resume from the last
//! id it saw. JSON mode adds `"id"` and `"room"` (or `"user":true`) to the push object; binary
//! transports put an op 25 PushMeta frame (`{"id":..,"room":..}`) right before the push frame,
//! in the same write or op 9 message. Pushes recorded nowhere go out as they always do.
//!
//! Built on first use per push and shared by every tagged session that gets it, like the plain
//! shapes in `writer`.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use rim_proto::frame::Frame;
use rim_proto::history::{HistoryId, Source};
use rim_proto::op;

/// A recorded push's id and history, and its tagged shapes once built.
#[derive(Debug)]
pub struct Tag {
    id: HistoryId,
    source: Source,
    frames: OnceLock<Bytes>,
    json: OnceLock<String>,
}

impl Tag {
    /// The tag of a push recorded as `id` in `source`'s history.
    pub fn new(id: HistoryId, source: Source) -> Self {
        Tag {
            id,
            source,
            frames: OnceLock::new(),
            json: OnceLock::new(),
        }
    }

    /// `"id":"ms-seq","room":"type://id"` or `"id":"ms-seq","user":true` (no braces).
    fn fields(&self) -> String {
        let id = self.id;
        match &self.source {
            Source::Room(room) => format!(
                r#""id":"{id}","room":{}"#,
                serde_json::Value::String(room.to_string())
            ),
            Source::User => format!(r#""id":"{id}","user":true"#),
        }
    }

    /// Binary shape: the PushMeta frame, then the push's `frame`.
    pub fn frames(&self, frame: &Bytes) -> Bytes {
        self.frames
            .get_or_init(|| {
                let meta =
                    Frame::new(op::PUSH_META, 0, format!("{{{}}}", self.fields())).to_bytes();
                let mut b = BytesMut::with_capacity(meta.len() + frame.len());
                b.extend_from_slice(&meta);
                b.extend_from_slice(frame);
                b.freeze()
            })
            .clone()
    }

    /// JSON shape: the push's object (`plain`) with `"id"` and its history.
    pub fn json(&self, plain: &str) -> &str {
        self.json.get_or_init(|| {
            // `{"op":..,"seq":0,"body":..}` → `{"op":..,"seq":0,"body":..,"id":..,"room":..}`
            let open = plain.strip_suffix('}').unwrap_or(plain);
            format!("{open},{}}}", self.fields())
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::writer::{EncodedPush, Out, tcp_bytes, ws_binary_messages, ws_json_messages};
    use rim_proto::room::RoomId;
    use std::sync::Arc;

    fn room_push() -> Arc<EncodedPush> {
        Arc::new(EncodedPush::new(1000, br#"{"a":1}"#).with_tag(
            HistoryId { ms: 5, seq: 2 },
            Source::Room(RoomId::parse("chat://a").unwrap()),
        ))
    }

    #[test]
    fn json_mode_adds_the_id_and_history_to_the_push_object() {
        let p = room_push();
        let v: serde_json::Value = serde_json::from_str(p.tagged_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":1000,"seq":0,"body":{"a":1},"id":"5-2","room":"chat://a"})
        );
        let user = EncodedPush::new(1000, b"x").with_tag(HistoryId { ms: 1, seq: 0 }, Source::User);
        let v: serde_json::Value = serde_json::from_str(user.tagged_json()).unwrap();
        assert_eq!(v["user"], true);
        assert_eq!(v["id"], "1-0");
        // Untagged sessions see the plain object; unrecorded pushes are plain for everyone.
        assert_eq!(p.json_text(), r#"{"op":1000,"seq":0,"body":{"a":1}}"#);
        let plain = EncodedPush::new(1000, b"y");
        assert_eq!(plain.tagged_json(), plain.json_text());
        let msgs = ws_json_messages(&[Out::Tagged(p.clone()), Out::Push(p.clone())]);
        let v: serde_json::Value = serde_json::from_str(&msgs[0]).unwrap();
        assert_eq!(v[0]["id"], "5-2");
        assert!(v[1].get("id").is_none());
    }

    #[test]
    fn binary_transports_put_a_push_meta_frame_before_the_push() {
        let p = room_push();
        let tcp = tcp_bytes(&[Out::Tagged(p.clone())]);
        let frames = Frame::split_batch(tcp, 1 << 20).unwrap();
        assert_eq!(
            frames.iter().map(|f| f.op).collect::<Vec<_>>(),
            [op::PUSH_META, 1000]
        );
        let meta: serde_json::Value = serde_json::from_slice(&frames[0].body).unwrap();
        assert_eq!(meta, serde_json::json!({"id":"5-2","room":"chat://a"}));
        let ws = ws_binary_messages(&[Out::Tagged(p.clone())]);
        let raw = Frame::decode_message(ws[0].clone(), 1 << 20).unwrap();
        assert_eq!(raw.op, op::RAW);
        let inner = Frame::split_batch(raw.body, 1 << 20).unwrap();
        assert_eq!(inner.len(), 2);
        assert_eq!(
            p.tagged_frames().as_ptr(),
            p.tagged_frames().as_ptr(),
            "built once"
        );
    }
}
