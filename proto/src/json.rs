//! WebSocket JSON mode (rim extension): the same frames as JSON text messages.
//!
//! Client → server: `{"ver":1,"op":7,"seq":1,"body":...}`. A string body is taken as the frame
//! body's bytes (`"live://1000"` for ChangeRoom, `"1000,1001"` for Sub); any other JSON value is
//! taken as its JSON text (the Auth object).
//!
//! Server → client: `{"op":N,"seq":N,"body":...}`, or an array of them for a batch. A body that is
//! valid JSON is embedded as JSON, anything else as a string.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::frame::{Frame, FrameError};

/// A client JSON message, before conversion to a [`Frame`].
#[derive(Debug, Deserialize)]
struct ClientMessage {
    #[serde(default)]
    ver: i16,
    op: i32,
    #[serde(default)]
    seq: i32,
    #[serde(default)]
    body: Value,
}

/// Why a JSON-mode message was rejected.
#[derive(Debug, thiserror::Error)]
pub enum JsonFrameError {
    /// Not a JSON object with a numeric `op`.
    #[error("bad JSON frame: {0}")]
    Syntax(#[from] serde_json::Error),
    /// The body breaks the frame limits.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Whether a text message opens a JSON-mode session: a JSON object, not a binary frame in text.
pub fn looks_like_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Parses one client JSON message into a frame, enforcing the body limit.
pub fn decode_client(text: &str, max_body: usize) -> Result<Frame, JsonFrameError> {
    let m: ClientMessage = serde_json::from_str(text)?;
    let body = match m.body {
        Value::Null => Bytes::new(),
        Value::String(s) => Bytes::from(s),
        other => Bytes::from(serde_json::to_vec(&other)?),
    };
    if body.len() > max_body {
        return Err(FrameError::TooBig {
            body_len: body.len(),
            max: max_body,
        }
        .into());
    }
    Ok(Frame {
        ver: m.ver,
        op: m.op,
        seq: m.seq,
        body,
    })
}

/// Appends `{"op":..,"seq":..,"body":..}` for one frame to `out`.
pub fn encode_server(out: &mut String, op: i32, seq: i32, body: &[u8]) {
    use std::fmt::Write;
    let _ = write!(out, "{{\"op\":{op},\"seq\":{seq},\"body\":");
    encode_body(out, body);
    out.push('}');
}

/// A body as JSON mode shows it: embedded as JSON when it is valid JSON (its text untouched,
/// so numbers keep every digit), else as a string (lossy UTF-8). Also the `body` of history
/// entries in the HTTP API.
pub fn encode_body(out: &mut String, body: &[u8]) {
    match std::str::from_utf8(body) {
        // Parsed into a `Value`, not skipped: a skip accepts numbers like 1e999999 that strict
        // clients then refuse, so those go out as strings. Runs once per push (encode-once).
        Ok(text) if !text.trim().is_empty() && serde_json::from_str::<Value>(text).is_ok() => {
            out.push_str(text.trim())
        }
        Ok(text) => out.push_str(&Value::String(text.to_string()).to_string()),
        Err(_) => {
            out.push_str(&Value::String(String::from_utf8_lossy(body).into_owned()).to_string())
        }
    }
}

/// One server JSON message for one frame.
pub fn encode_server_frame(f: &Frame) -> String {
    let mut s = String::with_capacity(f.body.len() + 32);
    encode_server(&mut s, f.op, f.seq, &f.body);
    s
}

/// One server JSON message for a batch of frames: an array, or a single object for one frame.
pub fn encode_server_batch<'a>(frames: impl IntoIterator<Item = (i32, i32, &'a [u8])>) -> String {
    let mut out = String::from("[");
    let mut n = 0;
    for (op, seq, body) in frames {
        if n > 0 {
            out.push(',');
        }
        encode_server(&mut out, op, seq, body);
        n += 1;
    }
    if n == 1 {
        // A single push is sent as a bare object, like every other server message.
        out.remove(0);
        return out;
    }
    out.push(']');
    out
}

/// One client JSON message for a frame (what a browser sends): a body that is a JSON object or
/// array is embedded as JSON, anything else as a string (so `"live://1"` and `"1000,1001"` arrive
/// as the same bytes a binary frame would carry).
pub fn encode_client(f: &Frame) -> String {
    let body = match serde_json::from_slice::<Value>(&f.body) {
        Ok(v) if v.is_object() || v.is_array() => v,
        _ => Value::String(String::from_utf8_lossy(&f.body).into_owned()),
    };
    serde_json::json!({"ver": f.ver, "op": f.op, "seq": f.seq, "body": body}).to_string()
}

/// One frame of a server JSON message, as a client decodes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerJsonFrame {
    /// The frame; its body is the string's bytes for a string `body`, else the value's JSON text.
    pub frame: Frame,
    /// The `body` value as sent.
    pub body: Value,
}

/// Decodes a server JSON message: one object, or an array of them (a batch).
pub fn decode_server(text: &str) -> Result<Vec<ServerJsonFrame>, JsonFrameError> {
    #[derive(Deserialize)]
    struct ServerMessage {
        op: i32,
        #[serde(default)]
        seq: i32,
        #[serde(default)]
        body: Value,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<ServerMessage>),
        One(ServerMessage),
    }
    let items = match serde_json::from_str::<OneOrMany>(text)? {
        OneOrMany::Many(v) => v,
        OneOrMany::One(m) => vec![m],
    };
    Ok(items
        .into_iter()
        .map(|m| {
            let body = match &m.body {
                Value::String(s) => Bytes::from(s.clone()),
                Value::Null => Bytes::new(),
                other => Bytes::from(other.to_string()),
            };
            ServerJsonFrame {
                frame: Frame::new(m.op, m.seq, body),
                body: m.body,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_bodies_map_to_frame_bytes() {
        let f = decode_client(r#"{"ver":1,"op":7,"seq":1,"body":{"mid":5}}"#, 4096).unwrap();
        assert_eq!((f.op, f.seq, &f.body[..]), (7, 1, &br#"{"mid":5}"#[..]));
        let f = decode_client(r#"{"op":12,"body":"live://1"}"#, 4096).unwrap();
        assert_eq!(&f.body[..], b"live://1");
        assert!(matches!(
            decode_client(r#"{"op":"x"}"#, 4096),
            Err(JsonFrameError::Syntax(_))
        ));
        assert!(matches!(
            decode_client(r#"{"op":4,"body":"xxxxxx"}"#, 3),
            Err(JsonFrameError::Frame(_))
        ));
    }

    #[test]
    fn server_bodies_embed_json_or_string() {
        assert_eq!(
            encode_server_frame(&Frame::new(1000, 0, &b"{\"a\":1}"[..])),
            r#"{"op":1000,"seq":0,"body":{"a":1}}"#
        );
        assert_eq!(
            encode_server_frame(&Frame::new(1000, 0, &b"hi \"x\""[..])),
            r#"{"op":1000,"seq":0,"body":"hi \"x\""}"#
        );
        assert_eq!(
            encode_server_frame(&Frame::new(13, 2, &b""[..])),
            r#"{"op":13,"seq":2,"body":""}"#
        );
        // A number no strict parser can hold is sent as a string (found by fuzzing).
        let v: Value = serde_json::from_str(&encode_server_frame(&Frame::new(
            1000,
            0,
            &b"10e2220500"[..],
        )))
        .unwrap();
        assert_eq!(v["body"], Value::String("10e2220500".into()));
        let batch = encode_server_batch([(1000, 0, &b"1"[..]), (1001, 0, &b"x"[..])]);
        let v: Value = serde_json::from_str(&batch).unwrap();
        assert_eq!(
            v,
            serde_json::json!([{"op":1000,"seq":0,"body":1},{"op":1001,"seq":0,"body":"x"}])
        );
    }

    #[test]
    fn client_encoding_and_server_decoding_round_trip() {
        let auth = Frame::new(7, 1, &br#"{"mid":5}"#[..]);
        let back = decode_client(&encode_client(&auth), 4096).unwrap();
        assert_eq!(back, auth);
        let room = Frame::new(12, 2, &b"live://1"[..]);
        assert_eq!(decode_client(&encode_client(&room), 4096).unwrap(), room);

        let one = decode_server(&encode_server_frame(&Frame::new(
            1000,
            0,
            &b"{\"a\":1}"[..],
        )))
        .unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(&one[0].frame.body[..], br#"{"a":1}"#);
        assert_eq!(one[0].body, serde_json::json!({"a":1}));
        let batch = decode_server(&encode_server_batch([
            (1000, 0, &b"x"[..]),
            (1001, 3, &b"2"[..]),
        ]))
        .unwrap();
        assert_eq!(
            batch
                .iter()
                .map(|f| (f.frame.op, f.frame.seq, f.frame.body.clone()))
                .collect::<Vec<_>>(),
            vec![(1000, 0, Bytes::from("x")), (1001, 3, Bytes::from("2"))]
        );
        assert!(decode_server("{\"seq\":1}").is_err(), "op is required");
    }
}
