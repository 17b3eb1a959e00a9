//! The production examples in `config/production/` and the production defaults: secrets come
//! from the environment and logic refuses to start without them (exit 64 naming the field), an
//! exposed HTTP port needs `push.secret`, and a config without `[demo]` has no dev sign-in.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use rim_testkit::api::{Api, eventually};
use rim_testkit::process::{Proc, binary, free_addr, repo};
use rim_testkit::redis::RedisServer;

/// `bin --config <config> --check` with `env`.
fn check(bin: &str, config: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary(bin));
    cmd.arg("--config").arg(repo().join(config)).arg("--check");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn refused_naming(out: &Output, field: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("config error: {field}:")),
        "{stderr}"
    );
}

const SECRETS: &[(&str, &str)] = &[
    ("RIM_LOGIC__AUTH__SECRET", "test-auth-secret"),
    ("RIM_LOGIC__PUSH__SECRET", "test-push-secret"),
    ("RIM_LOGIC__CLUSTER__SECRET", "test-cluster-secret"),
    ("RIM_COMET__CLUSTER__SECRET", "test-cluster-secret"),
    ("RIM_JOB__CLUSTER__SECRET", "test-cluster-secret"),
    ("RIM_COMET__SERVER_ID", "comet-prod-1"),
];

#[test]
fn production_examples_take_their_secrets_from_the_environment() {
    for bin in ["logic", "comet", "job"] {
        let out = check(
            &format!("rim-{bin}"),
            &format!("config/production/{bin}.toml"),
            SECRETS,
        );
        assert!(
            out.status.success(),
            "config/production/{bin}.toml --check: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Take the secrets away one at a time: each refusal names its field.
    let without = |name: &str| -> Vec<(&str, &str)> {
        SECRETS
            .iter()
            .copied()
            .filter(|(k, _)| *k != name)
            .collect()
    };
    let logic = "config/production/logic.toml";
    refused_naming(&check("rim-logic", logic, &[]), "auth.secret");
    refused_naming(
        &check("rim-logic", logic, &without("RIM_LOGIC__PUSH__SECRET")),
        "push.secret",
    );
    refused_naming(
        &check("rim-logic", logic, &without("RIM_LOGIC__CLUSTER__SECRET")),
        "cluster.secret",
    );
    let comet = "config/production/comet.toml";
    refused_naming(
        &check("rim-comet", comet, &without("RIM_COMET__SERVER_ID")),
        "server_id",
    );
    refused_naming(
        &check("rim-comet", comet, &without("RIM_COMET__CLUSTER__SECRET")),
        "cluster.secret",
    );
}

#[test]
fn an_exposed_http_port_without_a_push_secret_refuses_to_start() {
    // The dev example on its loopback address is fine; moved to all interfaces it is not.
    assert!(
        check("rim-logic", "config/logic.toml", &[])
            .status
            .success()
    );
    let exposed = [("RIM_LOGIC__LISTEN__HTTP", "0.0.0.0:3111")];
    refused_naming(
        &check("rim-logic", "config/logic.toml", &exposed),
        "push.secret",
    );
    // Token mode is the default, so leaving auth.mode out of a file needs a token secret.
    let no_mode = [("RIM_LOGIC__AUTH__MODE", "token")];
    refused_naming(
        &check("rim-logic", "config/logic.toml", &no_mode),
        "auth.secret",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_demo_section_there_is_no_dev_sign_in() {
    let redis = RedisServer::start();
    let http = free_addr();
    let url = redis.url();
    let (http_s, rpc_s) = (http.to_string(), free_addr().to_string());
    let mut env: Vec<(&str, String)> = SECRETS.iter().map(|(k, v)| (*k, v.to_string())).collect();
    env.extend([
        ("RIM_LOGIC__LISTEN__HTTP", http_s),
        ("RIM_LOGIC__LISTEN__RPC", rpc_s),
        ("RIM_LOGIC__REDIS__URL", url),
    ]);
    let _logic = Proc::spawn("logic", "rim-logic", "production/logic.toml", &env);
    let api = Api::new(http);
    eventually("logic ready", Duration::from_secs(20), || {
        let api = api.clone();
        async move { (api.get("/readyz").await.ok()?.status == 200).then_some(()) }
    })
    .await
    .unwrap();

    let r = api.post("/rim/dev/login?name=mallory", "").await.unwrap();
    assert_eq!((r.status, r.code()), (404, -404), "{:?}", r.body);
    assert_eq!(api.get("/").await.unwrap().status, 404, "no demo page");
    // The push routes and the listings want the secret.
    let r = api
        .post("/goim/push/all?operation=1000", "x")
        .await
        .unwrap();
    assert_eq!((r.status, r.code()), (401, -401));
    assert_eq!(api.get("/goim/online/total").await.unwrap().status, 401);
    let authed = api.clone().with_secret("test-push-secret");
    assert_eq!(authed.get("/goim/online/total").await.unwrap().status, 200);
}
