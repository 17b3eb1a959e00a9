//! The web chatroom demo in a real browser: a whole cluster in-process (two comets), then
//! `node testkit/browser/chat.mjs` drives headless Chromium through it — alice on comet A, bob
//! on comet B — and saves a screenshot of alice's page (to `target/chat-demo.png`, or to `docs/chat-demo.png`
//! with `RIM_UPDATE_SCREENSHOT=1`).
//!
//! Needs `/usr/bin/chromium` and `testkit/browser/node_modules` (`scripts/test.sh` installs
//! both). `RIM_SKIP_BROWSER=1` skips it.
#![allow(clippy::unwrap_used)]

mod common;

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
    let screenshot = browser::screenshot_path("chat-demo.png");
    let (ok, printed) = browser::run_script(
        "chat.mjs",
        &[
            logic_url.as_ref(),
            comet_a.as_ref(),
            comet_b.as_ref(),
            screenshot.as_os_str(),
        ],
        Duration::from_secs(120),
    )
    .await;
    cluster.stop().await;
    assert!(ok, "the browser chat test failed:\n{printed}");
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
}

/// A room id that is markup with a script in it (room ids may hold anything but whitespace).
const HOSTILE_ROOM: &str = "live://<img/src=x/onerror=window.__xss=1>";

/// logic's operator page in a real browser: two comets, a room with a member and pushes going
/// to it the whole time, then `node testkit/browser/admin.mjs` checks the page lists both
/// comets and the room and shows a push rate above zero, and saves a screenshot (to
/// `target/admin.png`, or `docs/admin.png` with `RIM_UPDATE_SCREENSHOT=1`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_page_in_a_real_browser() {
    const ADMIN: &str = "browser-test-admin-secret";
    if !browser::required("the real-browser operator page test") {
        return;
    }
    let cluster = Cluster::start_with(Options {
        comets: 2,
        logic: Box::new(|c| c.admin.secret = ADMIN.into()),
        ..Default::default()
    })
    .await;
    let auth = rim_proto::msg::AuthBody {
        mid: 4100,
        room_id: "live://stage".into(),
        accepts: vec![1000],
        platform: "web".into(),
        ..Default::default()
    };
    let mut member = rim_testkit::client::Conn::connect(
        rim_testkit::client::Transport::WsBinary,
        cluster.comets[1].http,
        &auth,
    )
    .await
    .unwrap();

    // A room named by a client to be markup: the page must show it as text.
    let hostile = rim_proto::msg::AuthBody {
        mid: 4101,
        room_id: HOSTILE_ROOM.into(),
        platform: "web".into(),
        ..Default::default()
    };
    let _hostile = rim_testkit::client::Conn::connect(
        rim_testkit::client::Transport::WsBinary,
        cluster.comets[0].http,
        &hostile,
    )
    .await
    .unwrap();

    // Pushes to the room until the page has been checked; the member reads them so nothing
    // backs up.
    let api = rim_testkit::api::Api::new(cluster.logic_http);
    let stop = tokio_util::sync::CancellationToken::new();
    let pusher = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                tick.tick().await;
                api.push_room(1000, "live", "stage", b"tick").await.unwrap();
            }
        }
    });
    let reader = tokio::spawn(async move { while member.recv_push().await.is_ok() {} });

    let servers: Vec<String> = cluster.comets.iter().map(|c| c.server_id.clone()).collect();
    let screenshot = browser::screenshot_path("admin.png");
    let (ok, printed) = browser::run_script(
        "admin.mjs",
        &[
            format!("http://{}", cluster.logic_http).as_ref(),
            ADMIN.as_ref(),
            servers.join(",").as_ref(),
            "live://stage".as_ref(),
            HOSTILE_ROOM.as_ref(),
            screenshot.as_os_str(),
        ],
        Duration::from_secs(120),
    )
    .await;
    stop.cancel();
    pusher.await.unwrap();
    reader.abort();
    cluster.stop().await;
    assert!(ok, "the operator page test failed:\n{printed}");
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );
}
