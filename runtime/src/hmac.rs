//! HMAC-SHA256, the one MAC rim uses (logic's v1 client tokens, the cluster handshake): a tag
//! over several parts, and a constant-time check of a claimed tag.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of a tag.
pub const TAG_LEN: usize = 32;

/// `None` never happens: HMAC takes keys of any length (the error exists for other MACs).
fn mac(key: &[u8], parts: &[&[u8]]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(key).ok()?;
    for p in parts {
        mac.update(p);
    }
    Some(mac)
}

/// The tag of `parts` (concatenated) under `key`.
pub fn sign(key: &[u8], parts: &[&[u8]]) -> [u8; TAG_LEN] {
    mac(key, parts).map_or([0; TAG_LEN], |m| m.finalize().into_bytes().into())
}

/// Whether `claimed` is the tag of `parts` under `key`, compared in constant time.
pub fn verify(key: &[u8], parts: &[&[u8]], claimed: &[u8]) -> bool {
    mac(key, parts).is_some_and(|m| m.verify_slice(claimed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4231_case_2_and_verification() {
        let tag = sign(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify(b"Jefe", &[b"what do ya want for nothing?"], &tag));
        assert!(!verify(b"jefe", &[b"what do ya want for nothing?"], &tag));
        assert!(!verify(
            b"Jefe",
            &[b"what do ya want for nothing?"],
            &tag[..31]
        ));
    }
}
