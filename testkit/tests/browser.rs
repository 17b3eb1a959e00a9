//! The web chatroom demo in a real browser: a whole cluster in-process (two comets), then
//! `node testkit/browser/chat.mjs` drives headless Chromium through it — alice on comet A, bob
//! on comet B — and saves a screenshot of alice's page (to `target/chat-demo.png`, or to `docs/chat-demo.png`
//! with `RIM_UPDATE_SCREENSHOT=1`).
//!
//! Needs `/usr/bin/chromium` and `testkit/browser/node_modules` (`scripts/test.sh` installs
//! both). `RIM_SKIP_BROWSER=1` skips it.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{Cluster, Options};
use rim_testkit::browser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_demo_in_a_real_browser() {
    if !browser::required("the real-browser chat demo test") {
        return;
    }

    let cluster = Cluster::start_with(Options {
        comets: 2,
        logic: Box::new(|c| {
            c.chat.presence_room_types = vec!["chat".into()];
            c.demo.enabled = true;
        }),
        ..Default::default()
    })
    .await;

    let logic_url = format!("http://{}", cluster.logic_http);
    let comet_a = cluster.comets[0].http.to_string();
    let comet_b = cluster.comets[1].http.to_string();
    // The screenshot goes under target/ so a test run leaves the tree clean;
    // RIM_UPDATE_SCREENSHOT=1 refreshes the one the README shows.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit sits inside the workspace");
    let screenshot = if std::env::var_os("RIM_UPDATE_SCREENSHOT").is_some() {
        root.join("docs/chat-demo.png")
    } else {
        root.join("target/chat-demo.png")
    };

    let child = tokio::process::Command::new("node")
        .arg("chat.mjs")
        .args([&logic_url, &comet_a, &comet_b])
        .arg(&screenshot)
        .current_dir(browser::dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node chat.mjs");
    // chat.mjs stops itself after 60 s; this only guards against node itself hanging.
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("chat.mjs did not exit within 120 s")
        .expect("wait for chat.mjs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- chat.mjs stdout\n{stdout}--- chat.mjs stderr\n{stderr}---");

    cluster.stop().await;
    assert!(
        out.status.success(),
        "the browser chat test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
}
