//! Protocol clients for the tests: [`rim_client::Conn`], the one client of rim's protocol, and
//! hand-made malformed frames for the bad-input tests (the only place frames are written by hand).

use bytes::{BufMut, BytesMut};

pub use rim_client::{Closed, Conn, Received, Transport, online_of};

/// Encodes a frame header with arbitrary (possibly invalid) fields, for malformed-input tests.
pub fn raw_frame(pack_len: i32, header_len: i16, op: i32, body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(pack_len);
    b.put_i16(header_len);
    b.put_i16(1);
    b.put_i32(op);
    b.put_i32(1);
    b.extend_from_slice(body);
    b.to_vec()
}
