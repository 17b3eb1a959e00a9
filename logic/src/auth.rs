//! Client tokens and the push API's bearer secret.
//!
//! A client token is `v1.<mid>.<expiry unix secs>.<hex hmac-sha256(secret, "v1.<mid>.<expiry>")>`:
//! a backend that knows the secret issues it, logic checks it at `connect` without any lookup.
//! A client token may also be a JWT (see [`crate::jwt`]); `auth.mode = "trust"` skips tokens
//! (goim's behaviour): the client's mid is believed.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// How a client's Auth is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A token is required (v1 HMAC signed with `auth.secret`, or a JWT); the default.
    #[default]
    Token,
    /// The mid a client claims is believed (goim compatibility; dev only, logged at start).
    Trust,
}

/// Client authentication (`[auth]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `"token"` (default) or `"trust"`.
    pub mode: AuthMode,
    /// HMAC secret of v1 client tokens; in token mode it or a JWT key must be set.
    pub secret: String,
    /// HS256 secret of JWT client tokens.
    pub jwt_secret: String,
    /// PEM public key (RSA → RS256, P-256 → ES256) of JWT client tokens.
    pub jwt_public_key_file: String,
    /// JWKS file (`{"keys":[...]}`) of JWT client tokens; the token's `kid` picks the key.
    pub jwks_file: String,
    /// When set, a JWT must carry this `aud`.
    pub jwt_audience: String,
    /// When set, a JWT must carry this `iss`.
    pub jwt_issuer: String,
}

impl AuthConfig {
    /// Whether any JWT key source is configured.
    pub fn jwt(&self) -> bool {
        !(self.jwt_secret.is_empty()
            && self.jwt_public_key_file.is_empty()
            && self.jwks_file.is_empty())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Issues a token for `mid` valid for `ttl` from now.
pub fn issue_token(secret: &str, mid: i64, ttl: Duration) -> String {
    issue_token_until(secret, mid, now_secs().saturating_add(ttl.as_secs()))
}

/// Issues a token for `mid` expiring at `expiry` (unix seconds).
pub fn issue_token_until(secret: &str, mid: i64, expiry: u64) -> String {
    let payload = format!("v1.{mid}.{expiry}");
    let sig = hex::encode(rim_runtime::hmac::sign(
        secret.as_bytes(),
        &[payload.as_bytes()],
    ));
    format!("{payload}.{sig}")
}

/// Why a token was refused; the text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token given.
    #[error("token required")]
    Missing,
    /// Signature fine but past its expiry.
    #[error("token expired")]
    Expired,
    /// Malformed, wrong mid, wrong signature, or a kind of token no key is configured for.
    #[error("token invalid")]
    Invalid,
    /// A JWT whose `nbf` is still ahead.
    #[error("token not yet valid")]
    NotYetValid,
    /// A JWT without the configured `auth.jwt_audience`.
    #[error("token audience rejected")]
    Audience,
    /// A JWT without the configured `auth.jwt_issuer`.
    #[error("token issuer rejected")]
    Issuer,
    /// A JWT whose `sub` is not the mid of the Auth body.
    #[error("token subject is not this mid")]
    Subject,
    /// The Auth body's room is not among the JWT's `rooms`.
    #[error("room not allowed by token")]
    Room,
}

/// Checks `token` for `mid` at the current time; `Ok` holds its expiry (unix seconds).
pub fn verify_token(secret: &str, mid: i64, token: &str) -> Result<u64, TokenError> {
    verify_token_at(secret, mid, token, now_secs())
}

/// Checks `token` for `mid` as of `now` (unix seconds); `Ok` holds its expiry.
pub fn verify_token_at(secret: &str, mid: i64, token: &str, now: u64) -> Result<u64, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    let mut parts = token.split('.');
    let (Some("v1"), Some(tmid), Some(texp), Some(tsig), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Invalid);
    };
    let (Ok(tmid), Ok(texp), Ok(sig)) =
        (tmid.parse::<i64>(), texp.parse::<u64>(), hex::decode(tsig))
    else {
        return Err(TokenError::Invalid);
    };
    let payload = format!("v1.{tmid}.{texp}");
    // Compared in constant time.
    if !rim_runtime::hmac::verify(secret.as_bytes(), &[payload.as_bytes()], &sig) || tmid != mid {
        return Err(TokenError::Invalid);
    }
    if texp <= now {
        return Err(TokenError::Expired);
    }
    Ok(texp)
}

/// Constant-time check of an `Authorization` header value against `Bearer <secret>`.
pub fn bearer_matches(header: Option<&str>, secret: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), secret.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_and_refuse() {
        let t = issue_token_until("s3cret", 42, 1_000);
        assert_eq!(verify_token_at("s3cret", 42, &t, 999), Ok(1_000));
        assert_eq!(
            verify_token_at("s3cret", 42, &t, 1_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            verify_token_at("other", 42, &t, 10),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            verify_token_at("s3cret", 43, &t, 10),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            verify_token_at("s3cret", 42, "", 10),
            Err(TokenError::Missing)
        );
        assert_eq!(
            verify_token_at("s3cret", 42, "v1.42.x.zz", 10),
            Err(TokenError::Invalid)
        );
        let forged = t.replace("v1.42.1000", "v1.42.9999");
        assert_eq!(
            verify_token_at("s3cret", 42, &forged, 10),
            Err(TokenError::Invalid)
        );
        let live = issue_token("k", -7, Duration::from_secs(60));
        assert!(verify_token("k", -7, &live).is_ok());
    }

    #[test]
    fn bearer() {
        assert!(bearer_matches(Some("Bearer abc"), "abc"));
        assert!(!bearer_matches(Some("Bearer abd"), "abc"));
        assert!(!bearer_matches(Some("abc"), "abc"));
        assert!(!bearer_matches(None, "abc"));
    }
}
