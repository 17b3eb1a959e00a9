#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};

use super::*;

const MID: i64 = 42;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// Claims for MID valid for an hour, plus `extra`.
fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": MID.to_string(), "exp": now() + 3600});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn hs(secret: &str, c: &Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::HS256), c, &key).unwrap()
}

fn rs(private: &str, kid: Option<&str>, c: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_string);
    encode(&h, c, &EncodingKey::from_rsa_pem(&pem(private)).unwrap()).unwrap()
}

fn es(kid: Option<&str>, c: &Value) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = kid.map(str::to_string);
    let key = EncodingKey::from_ec_pem(&pem("ec_private.pem")).unwrap();
    encode(&h, c, &key).unwrap()
}

fn verifier(f: impl FnOnce(&mut AuthConfig)) -> Verifier {
    let mut cfg = AuthConfig::default();
    f(&mut cfg);
    Verifier::load(&cfg).unwrap()
}

fn hs_verifier() -> Verifier {
    verifier(|c| c.jwt_secret = "jwt-s3cret".into())
}

fn refusal(v: &Verifier, token: &str) -> String {
    v.verify(MID, token).unwrap_err().to_string()
}

#[test]
fn hs256_good_and_sub_as_number() {
    let v = hs_verifier();
    let g = v
        .verify(MID, &hs("jwt-s3cret", &claims(json!({}))))
        .unwrap();
    assert_eq!(g.rooms, None);
    assert!(g.expires_ms > 0);
    let numeric = hs("jwt-s3cret", &claims(json!({"sub": MID})));
    assert!(v.verify(MID, &numeric).is_ok());
}

#[test]
fn rs256_and_es256_with_a_pem_key() {
    let v = verifier(|c| c.jwt_public_key_file = fixture("rsa_public.pem"));
    assert!(
        v.verify(MID, &rs("rsa_private.pem", None, &claims(json!({}))))
            .is_ok()
    );
    let forged = rs("rsa_other_private.pem", None, &claims(json!({})));
    assert_eq!(refusal(&v, &forged), "token invalid");
    // An ES256 token against the RSA key: refused.
    assert_eq!(refusal(&v, &es(None, &claims(json!({})))), "token invalid");

    let v = verifier(|c| c.jwt_public_key_file = fixture("ec_public.pem"));
    assert!(v.verify(MID, &es(None, &claims(json!({})))).is_ok());
    let rsa = rs("rsa_private.pem", None, &claims(json!({})));
    assert_eq!(refusal(&v, &rsa), "token invalid");
}

#[test]
fn jwks_chooses_by_kid() {
    let v = verifier(|c| c.jwks_file = fixture("jwks.json"));
    let c = claims(json!({}));
    assert!(
        v.verify(MID, &rs("rsa_private.pem", Some("rsa-1"), &c))
            .is_ok()
    );
    assert!(v.verify(MID, &es(Some("ec-1"), &c)).is_ok());
    // Unknown kid, missing kid, and an alg the kid's key does not have.
    assert_eq!(
        refusal(&v, &rs("rsa_private.pem", Some("nope"), &c)),
        "token invalid"
    );
    assert_eq!(
        refusal(&v, &rs("rsa_private.pem", None, &c)),
        "token invalid"
    );
    assert_eq!(refusal(&v, &es(Some("rsa-1"), &c)), "token invalid");
    let forged = rs("rsa_other_private.pem", Some("rsa-1"), &c);
    assert_eq!(refusal(&v, &forged), "token invalid");
}

#[test]
fn forged_expired_not_yet_valid() {
    let v = hs_verifier();
    assert_eq!(
        refusal(&v, &hs("other", &claims(json!({})))),
        "token invalid"
    );
    let t = hs("jwt-s3cret", &claims(json!({})));
    let (head, _) = t.rsplit_once('.').unwrap();
    assert_eq!(refusal(&v, &format!("{head}.AAAA")), "token invalid");
    let expired = hs("jwt-s3cret", &claims(json!({"exp": now() - 600})));
    assert_eq!(refusal(&v, &expired), "token expired");
    let early = hs("jwt-s3cret", &claims(json!({"nbf": now() + 600})));
    assert_eq!(refusal(&v, &early), "token not yet valid");
    let no_exp = hs("jwt-s3cret", &json!({"sub": "42"}));
    assert_eq!(refusal(&v, &no_exp), "token invalid");
    // An expired token with a bad signature says nothing about its claims.
    let forged_expired = hs("other", &claims(json!({"exp": now() - 600})));
    assert_eq!(refusal(&v, &forged_expired), "token invalid");
}

#[test]
fn audience_and_issuer_when_configured() {
    let v = verifier(|c| {
        c.jwt_secret = "jwt-s3cret".into();
        c.jwt_audience = "rim".into();
        c.jwt_issuer = "https://login.example".into();
    });
    let good = json!({"aud": "rim", "iss": "https://login.example"});
    assert!(v.verify(MID, &hs("jwt-s3cret", &claims(good))).is_ok());
    let wrong_aud = json!({"aud": "other", "iss": "https://login.example"});
    assert_eq!(
        refusal(&v, &hs("jwt-s3cret", &claims(wrong_aud))),
        "token audience rejected"
    );
    let no_aud = json!({"iss": "https://login.example"});
    assert_eq!(
        refusal(&v, &hs("jwt-s3cret", &claims(no_aud))),
        "token audience rejected"
    );
    let wrong_iss = json!({"aud": "rim", "iss": "https://evil.example"});
    assert_eq!(
        refusal(&v, &hs("jwt-s3cret", &claims(wrong_iss))),
        "token issuer rejected"
    );
    // Without the settings, aud / iss are not checked.
    let v = hs_verifier();
    let any = json!({"aud": "whatever", "iss": "anyone"});
    assert!(v.verify(MID, &hs("jwt-s3cret", &claims(any))).is_ok());
}

#[test]
fn missing_none_and_alg_confusion_refused() {
    let v = hs_verifier();
    assert_eq!(refusal(&v, ""), "token required");
    assert_eq!(refusal(&v, "not-a-token"), "token invalid");
    let t = hs("jwt-s3cret", &claims(json!({})));
    let payload = t.split('.').nth(1).unwrap();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    assert_eq!(refusal(&v, &none), "token invalid");

    // HS256 signed with the RSA public key's bytes against an RS256-only config.
    let rsa_only = verifier(|c| c.jwt_public_key_file = fixture("rsa_public.pem"));
    let pub_pem = String::from_utf8(pem("rsa_public.pem")).unwrap();
    let confused = hs(&pub_pem, &claims(json!({})));
    assert_eq!(refusal(&rsa_only, &confused), "token invalid");
    // And an RS256 token against an HS256-only config.
    let rs_token = rs("rsa_private.pem", None, &claims(json!({})));
    assert_eq!(refusal(&v, &rs_token), "token invalid");
}

#[test]
fn sub_must_be_the_mid() {
    let v = hs_verifier();
    let other = hs("jwt-s3cret", &claims(json!({"sub": "43"})));
    assert_eq!(refusal(&v, &other), "token subject is not this mid");
    let none = hs("jwt-s3cret", &json!({"exp": now() + 3600}));
    assert_eq!(refusal(&v, &none), "token subject is not this mid");
    let junk = hs("jwt-s3cret", &claims(json!({"sub": "forty-two"})));
    assert_eq!(refusal(&v, &junk), "token subject is not this mid");
}

#[test]
fn rooms_claim_limits_rooms() {
    let v = hs_verifier();
    let c = claims(json!({"rooms": ["live://1000", "chat://*"]}));
    let t = hs("jwt-s3cret", &c);
    let g = v.verify(MID, &t).unwrap();
    assert!(g.allows_room("live://1000"));
    assert!(g.allows_room("chat://anything"));
    assert!(!g.allows_room("live://1001"));
    assert!(!g.allows_room("chatroom://x"));
    assert!(!g.names_room("live://1001"));
    assert!(TokenGrant::default().allows_room("live://1001"));
    assert!(!TokenGrant::default().names_room("live://1001"));
    // The session may last as long as the token is accepted: exp plus the leeway.
    let exp = c["exp"].as_u64().unwrap();
    assert_eq!(g.expires_ms, (exp + LEEWAY_SECS) * 1000);
    let junk = hs("jwt-s3cret", &claims(json!({"rooms": "live://1"})));
    assert_eq!(refusal(&v, &junk), "token invalid");
}

#[test]
fn v1_tokens_still_work() {
    let v = verifier(|c| {
        c.secret = "v1-s3cret".into();
        c.jwt_secret = "jwt-s3cret".into();
    });
    let exp = now() as u64 + 60;
    let t = auth::issue_token_until("v1-s3cret", MID, exp);
    assert_eq!(
        v.verify(MID, &t).unwrap(),
        TokenGrant {
            rooms: None,
            expires_ms: exp * 1000
        }
    );
    assert_eq!(refusal(&v, &t.replace("v1.42", "v1.43")), "token invalid");
    // JWT-only: a v1 token is refused, not checked against an empty secret.
    let jwt_only = hs_verifier();
    let t = auth::issue_token("", MID, std::time::Duration::from_secs(60));
    assert_eq!(refusal(&jwt_only, &t), "token invalid");
}

#[test]
fn bad_key_files_name_their_field() {
    let field_of = |f: &dyn Fn(&mut AuthConfig)| {
        let mut cfg = AuthConfig::default();
        f(&mut cfg);
        let e = Verifier::load(&cfg).unwrap_err().to_string();
        e.split(':').next().unwrap().to_string()
    };
    assert_eq!(
        field_of(&|c| c.jwt_public_key_file = fixture("missing.pem")),
        "auth.jwt_public_key_file"
    );
    assert_eq!(
        field_of(&|c| c.jwt_public_key_file = fixture("jwks.json")),
        "auth.jwt_public_key_file"
    );
    assert_eq!(
        field_of(&|c| c.jwks_file = fixture("rsa_public.pem")),
        "auth.jwks_file"
    );
    // Secrets stay out of Debug.
    let v = verifier(|c| c.jwt_secret = "jwt-s3cret".into());
    assert!(!format!("{v:?}").contains("s3cret"));
}

#[test]
fn validation_wants_one_token_key_and_loads_files() {
    use crate::config::Config;
    use rim_runtime::settings::Validate;
    let field_of = |c: &Config| c.validate().unwrap_err().to_string();
    let mut c = Config::default();
    assert!(field_of(&c).starts_with("auth.secret"), "nothing set");
    c.auth.jwt_secret = "jwt-s3cret".into();
    c.validate().expect("a JWT secret alone is enough");
    let mut c = Config::default();
    c.auth.jwks_file = fixture("jwks.json");
    c.validate().expect("a JWKS alone is enough");
    c.auth.jwks_file = fixture("missing.json");
    assert!(field_of(&c).starts_with("auth.jwks_file"));
}

/// The connect path: the token is checked, then the JWT's `rooms` bound the room.
#[tokio::test]
async fn connect_checks_the_jwt_and_its_rooms() {
    use rim_proto::msg::AuthBody;
    use rim_proto::rpc::{ConnectRequest, LogicError};
    let mut config = crate::config::Config::default();
    config.auth.jwt_secret = "jwt-s3cret".into();
    let (app, _mem) = crate::App::in_memory(config);
    let req = |token: &str, room: &str| ConnectRequest {
        server: "c1".into(),
        auth: AuthBody {
            mid: MID,
            room_id: room.into(),
            token: token.into(),
            ..AuthBody::default()
        },
        remote_ip: "127.0.0.1".into(),
    };
    let t = hs("jwt-s3cret", &claims(json!({"rooms": ["live://*"]})));
    let reply = app.connect(req(&t, "live://7")).await.unwrap();
    assert_eq!(reply.mid, MID);
    let err = app.connect(req(&t, "chat://7")).await.unwrap_err();
    assert_eq!(
        err,
        LogicError::Unauthorized("room not allowed by token".into())
    );
    let forged = hs("other", &claims(json!({})));
    let err = app.connect(req(&forged, "")).await.unwrap_err();
    assert_eq!(err, LogicError::Unauthorized("token invalid".into()));
}
