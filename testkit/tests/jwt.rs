//! JWT client tokens against the real binaries: logic in token mode with an HS256 secret and an
//! RS256 public key (from the environment), a comet and a job. A client with a good JWT connects
//! and gets pushes; forged, expired, wrong-mid and out-of-room tokens are refused with the
//! reason; a bad key file stops logic at start naming its field.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rim_client::ClientError;
use rim_proto::msg::AuthBody;
use rim_testkit::api::Api;
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, binary, free_addr, repo};
use rim_testkit::redis::RedisServer;
use serde_json::{Value, json};

const SECRET: &str = "jwt-test-secret";

fn fixture(name: &str) -> String {
    repo()
        .join("logic/tests/fixtures/jwt")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn hs256(secret: &str, claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
}

fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
    let key = EncodingKey::from_rsa_pem(&pem).unwrap();
    encode(&Header::new(Algorithm::RS256), claims, &key).unwrap()
}

fn auth(mid: i64, room: &str, token: String) -> AuthBody {
    AuthBody {
        mid,
        room_id: room.into(),
        accepts: vec![1000],
        platform: "test".into(),
        token,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_clients_connect_and_bad_tokens_are_refused_with_the_reason() {
    let redis = RedisServer::start();
    let (logic_http, logic_rpc) = (free_addr(), free_addr());
    let env = [
        ("RIM_LOGIC__AUTH__MODE", "token".to_string()),
        ("RIM_LOGIC__AUTH__JWT_SECRET", SECRET.to_string()),
        (
            "RIM_LOGIC__AUTH__JWT_PUBLIC_KEY_FILE",
            fixture("rsa_public.pem"),
        ),
        ("RIM_LOGIC__AUTH__JWT_AUDIENCE", "rim".to_string()),
    ];
    let _logic = process::logic(&redis.url(), logic_http, logic_rpc, &env);
    let _job = process::job(&redis.url(), free_addr(), &[]);
    let a = CometAddrs::free();
    let _comet = process::comet("jwt-comet-1", a, logic_rpc, &[]);
    let api = Api::new(logic_http);
    api.wait_live_nodes(1, Duration::from_secs(20))
        .await
        .unwrap();

    let claims = |mid: Value, extra: Value| {
        let mut c = json!({"sub": mid, "aud": "rim", "exp": now() + 3600});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // Good tokens (HS256 with the sub as a string, RS256 with it as a number) connect and
    // receive pushes.
    let good = hs256(
        SECRET,
        &claims(json!("501"), json!({"rooms": ["live://*"]})),
    );
    let mut c1 = Conn::connect(Transport::Tcp, a.tcp, &auth(501, "live://jwt", good))
        .await
        .unwrap();
    let rs = rs256(&claims(json!(502), json!({})));
    let mut c2 = Conn::connect(Transport::WsBinary, a.http, &auth(502, "", rs))
        .await
        .unwrap();
    api.push_mids(1000, &[501, 502], b"hello-jwt")
        .await
        .unwrap();
    for c in [&mut c1, &mut c2] {
        assert_eq!(&c.recv_push().await.unwrap().frame.body[..], b"hello-jwt");
    }

    // Each bad token is refused, and the client is told why.
    let refused = [
        (
            hs256("forged", &claims(json!("503"), json!({}))),
            503,
            "",
            "token invalid",
        ),
        (
            hs256(SECRET, &claims(json!("503"), json!({"exp": now() - 600}))),
            503,
            "",
            "token expired",
        ),
        (
            hs256(SECRET, &claims(json!("999"), json!({}))),
            503,
            "",
            "token subject is not this mid",
        ),
        (
            hs256(SECRET, &claims(json!("503"), json!({"aud": "other"}))),
            503,
            "",
            "token audience rejected",
        ),
        (
            hs256(
                SECRET,
                &claims(json!("503"), json!({"rooms": ["live://1"]})),
            ),
            503,
            "live://2",
            "room not allowed by token",
        ),
        (String::new(), 503, "", "token required"),
    ];
    for (transport, addr) in [(Transport::Tcp, a.tcp), (Transport::WsBinary, a.http)] {
        for (token, mid, room, why) in &refused {
            let e = Conn::connect(transport, addr, &auth(*mid, room, token.clone()))
                .await
                .err()
                .unwrap_or_else(|| panic!("{why}: connected"));
            assert!(
                matches!(&e, ClientError::AuthRefused(closed) if closed.said(why)),
                "{transport:?} {why}: {e}"
            );
        }
    }
}

#[test]
fn a_jwt_key_alone_is_enough_and_a_bad_key_file_exits_64_naming_it() {
    let check = |env: &[(&str, String)]| {
        let mut cmd = Command::new(binary("rim-logic"));
        cmd.arg("--config")
            .arg(repo().join("config/logic.toml"))
            .arg("--check")
            .env("RIM_LOGIC__AUTH__MODE", "token");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let ok = check(&[("RIM_LOGIC__AUTH__JWKS_FILE", fixture("jwks.json"))]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    for (var, field, file) in [
        (
            "RIM_LOGIC__AUTH__JWT_PUBLIC_KEY_FILE",
            "auth.jwt_public_key_file",
            fixture("jwks.json"),
        ),
        (
            "RIM_LOGIC__AUTH__JWKS_FILE",
            "auth.jwks_file",
            fixture("nope.json"),
        ),
    ] {
        let out = check(&[(var, file)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(
            stderr.contains(&format!("config error: {field}:")),
            "{stderr}"
        );
    }
}
