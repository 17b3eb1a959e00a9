//! The JSON a client controls: the Auth body, the SendMsg body, room ids, op lists, and JSON-mode
//! messages. None may panic; the server's JSON encoding of any body must be valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rim_proto::msg::{AuthBody, SendMsgBody};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<AuthBody>(data);
    let _ = serde_json::from_slice::<SendMsgBody>(data);
    let _ = rim_proto::op::parse_op_list(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = rim_proto::room::RoomId::parse(text);
        if let Ok(f) = rim_proto::json::decode_client(text, 4096) {
            assert!(f.body.len() <= 4096);
        }
    }
    let out = rim_proto::json::encode_server_frame(&rim_proto::frame::Frame::new(1000, 1, data.to_vec()));
    serde_json::from_str::<serde_json::Value>(&out).expect("server JSON is always valid");
});
