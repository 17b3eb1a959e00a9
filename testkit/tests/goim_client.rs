//! goim's own JavaScript client works, unchanged, against a rim cluster in `auth.mode = "trust"`.
//!
//! The built `rim-logic` (trust mode set explicitly), `rim-job` and `rim-comet` run as processes;
//! `node testkit/browser/goim.mjs` opens goim's `examples/javascript/index.html` + `client.js`
//! (vendored byte for byte in `testkit/browser/goim/`, checked against goim's git blob ids) in
//! headless Chromium, with the client's hardcoded `ws://sh.tony.wiki:3102/sub` redirected to the
//! comet — the only shim. The client authenticates with its fixed body (mid 123, `live://1000`,
//! accepts 1000-1002) and heartbeats; then this test pushes through goim's HTTP routes exactly as
//! goim's index.html documents them (by mid, to room `live/1000`, to everyone) and checks that
//! the page shows each body once, on the one connection it opened, without a script error.
//! Five pushes to its mid before the page opens are offline messages (`history.deliver_on_connect`,
//! on by default): the page shows them first, in order — goim's client needs nothing new. Then
//! the page is reloaded (goim's client connects anew) and shows none of them again: only the
//! push made after it reconnected.
//!
//! Needs `cargo build --bins`, `/usr/bin/chromium`, node and `testkit/browser/node_modules`
//! (`scripts/test.sh` provides all). `RIM_SKIP_BROWSER=1` skips it.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use rim_testkit::api::{Api, eventually, metric};
use rim_testkit::browser;
use rim_testkit::process::{self, CometAddrs, free_addr};
use rim_testkit::redis::RedisServer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The mid goim's client.js claims in its Auth body.
const GOIM_MID: i64 = 123;
/// The bodies of the three `curl` lines in goim's index.html.
const MID_BODY: &str = "mid message";
const ROOM_BODY: &str = "room message";
const ALL_BODY: &str = "broadcast message";
/// Pushed to the mid before the page opens: offline messages it must show first, in order.
const OFFLINE: [&str; 5] = [
    "offline one",
    "offline two",
    "offline three",
    "offline four",
    "offline five",
];
/// Pushed to the mid once the reloaded page connected: the only message it may show.
const AGAIN_BODY: &str = "after the reload";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goims_javascript_client_works_unchanged_in_trust_mode() {
    if !browser::required("goim's JavaScript client test") {
        return;
    }
    let client_js = std::fs::read_to_string(browser::dir().join("goim/client.js")).unwrap();
    assert!(
        client_js.contains(&format!(r#"{{"mid":{GOIM_MID}, "room_id":"live://1000""#)),
        "goim/client.js no longer authenticates as mid {GOIM_MID} in live://1000"
    );

    let redis = RedisServer::start();
    let logic_http = free_addr();
    let logic_rpc = free_addr();
    let trust = [("RIM_LOGIC__AUTH__MODE", "trust".to_string())];
    let _logic = process::logic(&redis.url(), logic_http, logic_rpc, &trust);
    let _job = process::job(&redis.url(), free_addr(), &[]);
    let comet_addrs = CometAddrs::free();
    let _comet = process::comet("goim-js-comet", comet_addrs, logic_rpc, &[]);
    let api = Api::new(logic_http);
    api.wait_live_nodes(1, Duration::from_secs(20))
        .await
        .unwrap();

    // Nobody is online yet: kept in the user's history for goim's client to get at connect.
    for body in OFFLINE {
        let data = api
            .push_mids(1000, &[GOIM_MID], body.as_bytes())
            .await
            .unwrap();
        assert_eq!(data["delivery"], "stored", "{data}");
    }

    let mut node = tokio::process::Command::new("node")
        .arg("goim.mjs")
        .arg(comet_addrs.http.to_string())
        .args(OFFLINE)
        .args([MID_BODY, ROOM_BODY, ALL_BODY])
        .args(["--again", AGAIN_BODY])
        .current_dir(browser::dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node goim.mjs");
    let mut stderr = node.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut stdout = BufReader::new(node.stdout.take().unwrap()).lines();
    // goim.mjs gives up after 60 s on its own; these limits only guard against node hanging.
    let mut next_line = async move |what: &str| {
        tokio::time::timeout(Duration::from_secs(90), stdout.next_line())
            .await
            .unwrap_or_else(|_| panic!("goim.mjs printed no {what} within 90 s"))
            .unwrap()
    };

    let line = next_line("`ready`").await;
    if line.as_deref() != Some("ready") {
        let status = node.wait().await.unwrap();
        panic!(
            "goim's client never got ready (first stdout line {line:?}, {status}):\n{}",
            stderr.await.unwrap()
        );
    }

    // goim's index.html: curl -d 'mid message' '.../goim/push/mids?operation=1000&mids=123'
    let data = api
        .push_mids(1000, &[GOIM_MID], MID_BODY.as_bytes())
        .await
        .unwrap();
    assert_eq!(
        data["sessions"], 1,
        "logic believed the mid goim's client claimed: {data}"
    );
    // curl -d 'room message' '.../goim/push/room?operation=1000&type=live&room=1000'
    api.push_room(1000, "live", "1000", ROOM_BODY.as_bytes())
        .await
        .unwrap();
    // curl -d 'broadcast message' '.../goim/push/all?operation=1000'
    api.push_all(1000, ALL_BODY.as_bytes()).await.unwrap();

    let first = next_line("result").await;
    // The page reloads: its old session ends (logic counts the disconnect once it is done) and
    // the new one is the user's only session.
    let again_ready = next_line("second `ready`").await;
    let reconnected = if again_ready.as_deref() == Some("ready") {
        eventually(
            "the first page's session to end",
            Duration::from_secs(20),
            || {
                let api = &api;
                async move {
                    let done = metric(logic_http, "rim_logic_disconnects_total").await?;
                    let r = api
                        .get(&format!("/rim/users/{GOIM_MID}/sessions"))
                        .await
                        .ok()?;
                    let live = r.data().as_array()?.len();
                    (done == 1 && live == 1).then_some(())
                }
            },
        )
        .await
        .unwrap();
        let data = api
            .push_mids(1000, &[GOIM_MID], AGAIN_BODY.as_bytes())
            .await
            .unwrap();
        assert_eq!(
            (&data["sessions"], &data["delivery"]),
            (&1.into(), &"both".into()),
            "{data}"
        );
        next_line("second result").await
    } else {
        None
    };
    let status = tokio::time::timeout(Duration::from_secs(30), node.wait())
        .await
        .expect("goim.mjs did not exit")
        .unwrap();
    let stderr = stderr.await.unwrap();
    println!(
        "--- goim.mjs results\n{first:?}\n{again_ready:?}\n{reconnected:?}\n--- goim.mjs stderr\n{stderr}---"
    );
    assert!(
        status.success(),
        "goim's client did not show the pushes ({status}):\n{stderr}"
    );

    let seen: Value = serde_json::from_str(&first.unwrap()).unwrap();
    let mut messages: Vec<&str> = seen["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    // The offline messages came first, in the order they were pushed (the live pushes were
    // sent once the page was ready).
    assert_eq!(
        messages.get(..OFFLINE.len()),
        Some(&OFFLINE[..]),
        "offline messages first: {seen}"
    );
    let mut messages = messages.split_off(OFFLINE.len());
    messages.sort_unstable();
    let mut want = vec![MID_BODY, ROOM_BODY, ALL_BODY];
    want.sort_unstable();
    assert_eq!(
        messages, want,
        "each push shown exactly once, nothing else: {seen}"
    );
    check_page(&seen, comet_addrs.http);

    // The next connect gets none of them again: only what was pushed once it was online.
    let seen: Value = serde_json::from_str(&reconnected.unwrap()).unwrap();
    assert_eq!(
        seen["messages"],
        serde_json::json!([AGAIN_BODY]),
        "the reloaded page: {seen}"
    );
    check_page(&seen, comet_addrs.http);
}

/// The page's status is ok, it threw nothing, and it opened one connection, to the comet.
fn check_page(seen: &Value, comet: std::net::SocketAddr) {
    assert_eq!(seen["status"], "ok", "#status after the auth reply: {seen}");
    assert_eq!(
        seen["pageErrors"].as_array().map(Vec::len),
        Some(0),
        "goim's client threw: {seen}"
    );
    let sockets = seen["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 1, "one connection, never re-opened: {seen}");
    assert_eq!(sockets[0]["requested"], "ws://sh.tony.wiki:3102/sub");
    assert_eq!(sockets[0]["opened"], format!("ws://{comet}/sub").as_str());
}
