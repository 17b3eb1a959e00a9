//! Client tokens, dispatched: `v1.…` is a v1 HMAC token ([`crate::auth`]); anything else with
//! two dots is a JWT checked against the configured keys.
//!
//! JWT rules: the header's `alg` must fit a configured key (HS256 only with `auth.jwt_secret`,
//! RS256 only with an RSA key, ES256 only with a P-256 key, from `auth.jwt_public_key_file` or
//! the `auth.jwks_file` key its `kid` names; never `none`); `exp` is required, `nbf` checked when
//! present (both with [`LEEWAY_SECS`] of clock skew), `aud` / `iss` required and checked when
//! `auth.jwt_audience` / `auth.jwt_issuer` are set; `sub` must be the Auth body's mid (a string
//! or a number). An optional `rooms` claim lists the rooms the session may be in (`type://id`,
//! or `type://*` for any room of a type).

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use rim_runtime::settings::SettingsError;
use serde::Deserialize;

use rim_proto::rpc::TokenGrant;

use crate::auth::{self, AuthConfig, TokenError};

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 30;

/// The JWT claims rim reads (others are ignored).
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    exp: u64,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Checks client tokens of both kinds; built once from `[auth]` (key files read at start).
pub struct Verifier {
    v1_secret: String,
    hs256: Option<DecodingKey>,
    /// The PEM public key and the one algorithm it verifies.
    public: Option<(Algorithm, DecodingKey)>,
    /// JWKS keys by kid.
    jwks: HashMap<String, (Algorithm, DecodingKey)>,
    audience: String,
    issuer: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets.
        f.debug_struct("Verifier")
            .field("v1", &!self.v1_secret.is_empty())
            .field("hs256", &self.hs256.is_some())
            .field("public", &self.public.as_ref().map(|(a, _)| *a))
            .field("jwks_kids", &self.jwks.len())
            .finish()
    }
}

fn bad(field: &str, msg: impl std::fmt::Display) -> SettingsError {
    SettingsError::invalid(field, msg.to_string())
}

fn read(field: &str, path: &str) -> Result<Vec<u8>, SettingsError> {
    std::fs::read(path).map_err(|e| bad(field, format!("cannot read {path:?}: {e}")))
}

/// The public key in a PEM file and the algorithm it verifies.
fn load_pem(path: &str) -> Result<(Algorithm, DecodingKey), SettingsError> {
    const FIELD: &str = "auth.jwt_public_key_file";
    let pem = read(FIELD, path)?;
    if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, k));
    }
    Err(bad(
        FIELD,
        format!("{path:?} holds no RSA or P-256 public key in PEM"),
    ))
}

/// The signing keys of a JWKS file by kid (keys marked for encryption are skipped).
fn load_jwks(path: &str) -> Result<HashMap<String, (Algorithm, DecodingKey)>, SettingsError> {
    const FIELD: &str = "auth.jwks_file";
    let set: JwkSet = serde_json::from_slice(&read(FIELD, path)?)
        .map_err(|e| bad(FIELD, format!("{path:?} is not a JWKS: {e}")))?;
    let mut out = HashMap::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(kid) = jwk.common.key_id.clone() else {
            return Err(bad(FIELD, "every signing key needs a kid"));
        };
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => return Err(bad(FIELD, format!("key {kid:?}: only RSA and P-256 keys"))),
        };
        if let Some(a) = jwk.common.key_algorithm
            && format!("{a:?}") != format!("{alg:?}")
        {
            return Err(bad(FIELD, format!("key {kid:?}: alg {a:?} is not {alg:?}")));
        }
        let key =
            DecodingKey::from_jwk(jwk).map_err(|e| bad(FIELD, format!("key {kid:?}: {e}")))?;
        if out.insert(kid.clone(), (alg, key)).is_some() {
            return Err(bad(FIELD, format!("kid {kid:?} appears twice")));
        }
    }
    if out.is_empty() {
        return Err(bad(FIELD, format!("{path:?} holds no signing key")));
    }
    Ok(out)
}

impl Verifier {
    /// Reads and parses the configured keys; an unreadable or bad file names its field.
    pub fn load(cfg: &AuthConfig) -> Result<Verifier, SettingsError> {
        let hs256 = if cfg.jwt_secret.is_empty() {
            None
        } else {
            Some(
                DecodingKey::from_secret(cfg.jwt_secret.as_bytes())
                    .map_err(|e| bad("auth.jwt_secret", e))?,
            )
        };
        let public = match cfg.jwt_public_key_file.as_str() {
            "" => None,
            path => Some(load_pem(path)?),
        };
        let jwks = match cfg.jwks_file.as_str() {
            "" => HashMap::new(),
            path => load_jwks(path)?,
        };
        Ok(Verifier {
            v1_secret: cfg.secret.clone(),
            hs256,
            public,
            jwks,
            audience: cfg.jwt_audience.clone(),
            issuer: cfg.jwt_issuer.clone(),
        })
    }

    /// Checks `token` for `mid`: a v1 token grants any room, a JWT what its claims say.
    /// Checks a client token for `mid`: what it grants, with the session's end (the expiry, plus
    /// [`LEEWAY_SECS`] for a JWT, since that is how long it is accepted).
    pub fn verify(&self, mid: i64, token: &str) -> Result<TokenGrant, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.starts_with("v1.") {
            if self.v1_secret.is_empty() {
                return Err(TokenError::Invalid);
            }
            let expiry = auth::verify_token(&self.v1_secret, mid, token)?;
            return Ok(TokenGrant {
                rooms: None,
                expires_ms: expiry.saturating_mul(1000),
            });
        }
        if token.bytes().filter(|b| *b == b'.').count() != 2 {
            return Err(TokenError::Invalid);
        }
        self.verify_jwt(mid, token)
    }

    fn key_for(&self, header: &jsonwebtoken::Header) -> Option<&DecodingKey> {
        match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            alg @ (Algorithm::RS256 | Algorithm::ES256) => {
                let (kalg, key) = match &header.kid {
                    Some(kid) if !self.jwks.is_empty() => self.jwks.get(kid)?,
                    _ => self.public.as_ref()?,
                };
                (*kalg == alg).then_some(key)
            }
            _ => None,
        }
    }

    fn verify_jwt(&self, mid: i64, token: &str) -> Result<TokenGrant, TokenError> {
        // An unknown alg (including "none") fails to parse here.
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        let key = self.key_for(&header).ok_or(TokenError::Invalid)?;
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let mut required = vec!["exp"];
        if self.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&[&self.audience]);
            required.push("aud");
        }
        if !self.issuer.is_empty() {
            v.set_issuer(&[&self.issuer]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidAudience => TokenError::Audience,
            ErrorKind::InvalidIssuer => TokenError::Issuer,
            ErrorKind::MissingRequiredClaim(c) if c == "aud" => TokenError::Audience,
            ErrorKind::MissingRequiredClaim(c) if c == "iss" => TokenError::Issuer,
            _ => TokenError::Invalid,
        })?;
        let c = data.claims;
        let sub = match &c.sub {
            Some(serde_json::Value::String(s)) => s.parse::<i64>().ok(),
            Some(serde_json::Value::Number(n)) => n.as_i64(),
            _ => None,
        };
        if sub != Some(mid) {
            return Err(TokenError::Subject);
        }
        Ok(TokenGrant {
            rooms: c.rooms,
            expires_ms: c.exp.saturating_add(LEEWAY_SECS).saturating_mul(1000),
        })
    }
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
