//! Registry rules against the in-memory stores under a paused clock: registration and kicks,
//! room member counts, presence events, heartbeats after Redis lost a session, purging a
//! departed comet. The same rules on Redis are covered by `logic/tests/`.

use std::sync::Arc;
use std::time::Duration;

use rim_proto::job::{self, Route};
use rim_proto::msg::{AuthBody, RoomEventBody};
use rim_proto::op;
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    ConnectReply, ConnectRequest, LogicError as RpcError, NodeInfo, OnlineReport, SessionRef,
};

use crate::App;
use crate::config::Config;
use crate::store::memory::Memory;

/// An app in trust mode (these rules are about registration, not tokens).
fn app(mut config: Config) -> (Arc<App>, Arc<Memory>) {
    config.auth.mode = crate::config::AuthMode::Trust;
    App::in_memory(config)
}

fn req(server: &str, mid: i64, key: &str, room: &str) -> ConnectRequest {
    ConnectRequest {
        server: server.into(),
        auth: AuthBody {
            mid,
            key: key.into(),
            room_id: room.into(),
            ..AuthBody::default()
        },
        remote_ip: "127.0.0.1".into(),
    }
}

fn sref(server: &str, mid: i64, key: &str) -> SessionRef {
    SessionRef {
        server: server.into(),
        mid,
        key: key.into(),
    }
}

fn room(s: &str) -> RoomId {
    RoomId::parse(s).expect("room id")
}

async fn connect(app: &App, server: &str, mid: i64, key: &str, room: &str) -> ConnectReply {
    app.connect(req(server, mid, key, room))
        .await
        .expect("connect")
}

/// Presence events (op 24) appended so far, as (event, mid, room).
fn presence_events(mem: &Memory) -> Vec<(String, i64, String)> {
    mem.all_jobs()
        .into_iter()
        .filter(|j| j.op == op::ROOM_EVENT)
        .map(|j| {
            let b: RoomEventBody = serde_json::from_slice(&j.body).expect("room event body");
            (b.event, b.mid, b.room)
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn connect_registers_the_session_its_comet_and_its_room_count() {
    let (app, mem) = app(Config::default());
    let reply = connect(&app, "c1", 7, "k1", "live://a").await;
    assert_eq!((reply.mid, reply.key.as_str()), (7, "k1"));
    assert!(!reply.replaced_elsewhere);
    let s = mem.session("k1").expect("registered");
    assert_eq!((s.mid.as_str(), s.server.as_str()), ("7", "c1"));
    assert_eq!(s.rooms, vec!["live://a".to_string()]);
    assert_eq!(s.since_ms, reply.since_ms);
    assert!(mem.node_sessions("c1").contains("k1"));
    assert_eq!(mem.members("live://a", 7), Some(1));
    assert!(
        mem.all_jobs().is_empty(),
        "no kick, no presence (off by default)"
    );
}

#[tokio::test(start_paused = true)]
async fn a_key_registered_to_another_user_is_refused() {
    let (app, mem) = app(Config::default());
    connect(&app, "c1", 1, "shared", "").await;
    let err = app.connect(req("c1", 2, "shared", "")).await.unwrap_err();
    assert!(
        matches!(err, RpcError::Unauthorized(ref m) if m.contains("another user")),
        "{err:?}"
    );
    assert_eq!(mem.session("shared").map(|s| s.mid), Some("1".into()));
}

#[tokio::test(start_paused = true)]
async fn reauth_on_another_comet_kicks_the_old_copy_without_double_counting() {
    let (app, mem) = app(Config::default());
    let first = connect(&app, "c1", 5, "k", "live://a").await;
    let second = connect(&app, "c2", 5, "k", "live://a").await;
    assert!(second.replaced_elsewhere);
    assert!(!mem.node_sessions("c1").contains("k"));
    assert!(mem.node_sessions("c2").contains("k"));
    let p = job::mid_partition(5, app.config.stream.partitions);
    let kicks: Vec<Route> = mem.stream(p).into_iter().map(|j| j.route).collect();
    assert_eq!(
        kicks,
        vec![Route::Kick {
            server: "c1".into(),
            key: "k".into(),
            since_ms: first.since_ms,
        }],
        "the kick names the replaced session by its registration time"
    );
    assert_eq!(
        mem.members("live://a", 5),
        Some(1),
        "one session, counted once"
    );
}

#[tokio::test(start_paused = true)]
async fn room_changes_move_the_count_and_only_the_holding_comet_may_move_it() {
    let (app, mem) = app(Config::default());
    connect(&app, "c1", 3, "k", "live://a").await;
    app.room_changed(
        sref("c2", 3, "k"),
        Some(room("live://a")),
        Some(room("live://b")),
    )
    .await
    .expect("ignored, not an error");
    assert_eq!(
        mem.members("live://a", 3),
        Some(1),
        "a comet that does not hold it changes nothing"
    );
    // The comet's claim of where it was is not trusted: the stored room is what was counted.
    app.room_changed(
        sref("c1", 3, "k"),
        Some(room("live://zzz")),
        Some(room("live://b")),
    )
    .await
    .expect("room change");
    assert_eq!(mem.members("live://a", 3), None);
    assert_eq!(mem.members("live://b", 3), Some(1));
    app.room_changed(sref("c1", 3, "k"), Some(room("live://b")), None)
        .await
        .expect("leave all rooms");
    assert_eq!(mem.members("live://b", 3), None);
    assert_eq!(mem.session("k").map(|s| s.rooms), Some(Vec::new()));
}

/// Auth's `rooms` besides `room_id`: joined in that order, a repeat once, blanks around an id
/// ignored and blank entries skipped (as the comet counts them); a bad id is a bad request.
#[tokio::test(start_paused = true)]
async fn connect_joins_every_room_of_the_auth_body() {
    let (app, mem) = app(Config::default());
    let mut r = req("c1", 3, "k", "live://a");
    r.auth.rooms = vec![" live://b ".into(), String::new(), "live://a".into()];
    let reply = app.connect(r).await.expect("connect");
    assert_eq!(reply.rooms, vec![room("live://a"), room("live://b")]);
    assert_eq!(
        mem.session("k").map(|s| s.rooms),
        Some(vec!["live://a".to_string(), "live://b".to_string()])
    );
    assert_eq!(mem.members("live://b", 3), Some(1));
    let mut bad = req("c1", 4, "k4", "");
    bad.auth.rooms = vec!["nope".into()];
    let e = app.connect(bad).await.expect_err("bad room id");
    assert!(
        matches!(&e, RpcError::BadRequest(m) if m.starts_with("rooms[0]")),
        "{e:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn joins_and_leaves_count_a_session_once_per_room() {
    let (app, mem) = app(Config::default());
    connect(&app, "c1", 3, "k", "live://a").await;
    for r in ["live://b", "live://c", "live://b"] {
        app.join_room(sref("c1", 3, "k"), room(r))
            .await
            .expect("join");
    }
    let rooms = |mem: &Memory| mem.session("k").map(|s| s.rooms).unwrap_or_default();
    assert_eq!(rooms(&mem), vec!["live://a", "live://b", "live://c"]);
    for r in ["live://a", "live://b", "live://c"] {
        assert_eq!(mem.members(r, 3), Some(1), "{r}");
    }
    app.leave_room(sref("c1", 3, "k"), room("live://a"))
        .await
        .expect("leave");
    assert_eq!(rooms(&mem), vec!["live://b", "live://c"]);
    assert_eq!(mem.members("live://a", 3), None);
    // Leaving a room it is not in changes nothing.
    app.leave_room(sref("c1", 3, "k"), room("live://a"))
        .await
        .expect("leave again");
    assert_eq!(mem.members("live://b", 3), Some(1));
    app.disconnect(sref("c1", 3, "k"), None)
        .await
        .expect("disconnect");
    assert_eq!(mem.members("live://b", 3), None);
    assert_eq!(mem.members("live://c", 3), None);
}

#[tokio::test(start_paused = true)]
async fn counts_follow_sessions_and_never_go_negative() {
    let (app, mem) = app(Config::default());
    connect(&app, "c1", 9, "k1", "live://a").await;
    connect(&app, "c2", 9, "k2", "live://a").await;
    assert_eq!(mem.members("live://a", 9), Some(2));
    app.disconnect(sref("c1", 9, "k1"), None)
        .await
        .expect("disconnect");
    assert_eq!(mem.members("live://a", 9), Some(1));
    // A repeated (late) disconnect of the same session changes nothing.
    app.disconnect(sref("c1", 9, "k1"), None)
        .await
        .expect("disconnect again");
    assert_eq!(mem.members("live://a", 9), Some(1));
    // So does one from a comet that does not hold the session.
    app.disconnect(sref("c1", 9, "k2"), None)
        .await
        .expect("wrong comet");
    assert_eq!(mem.members("live://a", 9), Some(1));
    app.disconnect(sref("c2", 9, "k2"), None)
        .await
        .expect("disconnect");
    assert_eq!(mem.members("live://a", 9), None);
    assert!(mem.session("k2").is_none());
}

#[tokio::test(start_paused = true)]
async fn presence_events_mark_a_users_first_join_and_last_leave() {
    let mut config = Config::default();
    config.chat.presence_room_types = vec!["live".into()];
    let (app, mem) = app(config);
    connect(&app, "c1", 4, "k1", "live://a").await;
    connect(&app, "c2", 4, "k2", "live://a").await;
    connect(&app, "c1", 8, "k3", "other://x").await;
    app.disconnect(sref("c1", 4, "k1"), None)
        .await
        .expect("disconnect");
    assert_eq!(
        presence_events(&mem),
        vec![("join".to_string(), 4, "live://a".to_string())],
        "second session and other room types: no event"
    );
    app.disconnect(sref("c2", 4, "k2"), None)
        .await
        .expect("disconnect");
    assert_eq!(
        presence_events(&mem).last(),
        Some(&("leave".to_string(), 4, "live://a".to_string()))
    );
    let p = job::room_partition(&room("live://a"), app.config.stream.partitions);
    assert!(
        mem.stream(p)
            .iter()
            .all(|j| j.route == Route::Room(room("live://a"))),
        "room events go to the room's partition"
    );
}

#[tokio::test(start_paused = true)]
async fn a_session_lost_by_redis_is_recreated_by_its_heartbeat_without_a_room() {
    let (app, mem) = app(Config::default());
    connect(&app, "c1", 2, "k", "live://a").await;
    let ttl = Duration::from_secs(app.config.session.ttl_secs());
    tokio::time::advance(ttl / 2).await;
    app.heartbeat(sref("c1", 2, "k")).await.expect("heartbeat");
    tokio::time::advance(ttl / 2 + Duration::from_secs(1)).await;
    assert!(mem.session("k").is_some(), "a heartbeat renews the session");
    tokio::time::advance(ttl + Duration::from_secs(1)).await;
    assert!(mem.session("k").is_none(), "lapsed without heartbeats");

    app.heartbeat(sref("c1", 2, "k")).await.expect("heartbeat");
    let s = mem.session("k").expect("re-created");
    assert_eq!(
        (s.rooms, s.since_ms),
        (Vec::<String>::new(), 0),
        "no room and an unknown registration time"
    );
    // A session that moved to another comet is not taken back by a late heartbeat.
    connect(&app, "c2", 2, "k", "").await;
    app.heartbeat(sref("c1", 2, "k")).await.expect("heartbeat");
    assert_eq!(mem.session("k").map(|s| s.server), Some("c2".into()));
}

#[tokio::test(start_paused = true)]
async fn unregistering_a_comet_drops_its_sessions_rooms_and_counts() {
    let (app, mem) = app(Config::default());
    let node = NodeInfo {
        server: "c1".into(),
        started_ms: 1,
        ..NodeInfo::default()
    };
    let report = OnlineReport {
        rooms: vec![(room("live://a"), 2)],
    };
    let counts = app.renew_node(node, report).await.expect("renew");
    assert_eq!(counts.rooms, vec![(room("live://a"), 2)]);
    connect(&app, "c1", 1, "k1", "live://a").await;
    connect(&app, "c1", 2, "k2", "live://a").await;
    assert!(mem.room_nodes("live://a").contains("c1"));

    app.unregister_node("c1".into()).await.expect("unregister");
    assert!(mem.session("k1").is_none() && mem.session("k2").is_none());
    assert_eq!(
        (mem.members("live://a", 1), mem.members("live://a", 2)),
        (None, None)
    );
    assert!(mem.room_nodes("live://a").is_empty());
    assert!(mem.node_sessions("c1").is_empty());
    assert!(app.cluster_view().await.expect("view").nodes.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_restarted_comet_purges_its_previous_incarnation() {
    let (app, mem) = app(Config::default());
    let node = |started_ms| NodeInfo {
        server: "c1".into(),
        started_ms,
        ..NodeInfo::default()
    };
    app.renew_node(node(1), OnlineReport::default())
        .await
        .expect("renew");
    connect(&app, "c1", 1, "old", "live://a").await;
    app.renew_node(node(1), OnlineReport::default())
        .await
        .expect("renew again");
    assert!(mem.session("old").is_some(), "same incarnation: kept");
    app.renew_node(node(2), OnlineReport::default())
        .await
        .expect("restart");
    assert!(
        mem.session("old").is_none(),
        "previous incarnation's session purged"
    );
    assert_eq!(mem.members("live://a", 1), None);
}

/// Appends a push to `mid` routed to `key` on `server`, as a push that read the user's index
/// then would (the index may name a session that is gone by the append).
async fn push_routed(app: &App, mid: i64, key: &str, server: &str) {
    let (key, server) = (key.to_string(), server.to_string());
    let record = app
        .user_record(mid, [(&key, &server)])
        .expect("users keep history");
    let target = crate::publish::Target {
        partition: job::mid_partition(mid, app.config.stream.partitions),
        route: Route::Sessions(vec![job::ServerKeys {
            server,
            keys: vec![key],
        }]),
        history: vec![record],
    };
    let body = bytes::Bytes::from_static(b"m");
    let id = crate::publish::new_msg_id();
    app.append_jobs(&id, 1000, &body, vec![target], None)
        .await
        .expect("append");
}

/// A catch-up of session `key`: everything in the user's history is given to its device.
async fn catch_up(app: &App, mid: i64, key: &str) {
    let want = rim_proto::history::HistoryWant {
        source: rim_proto::history::Source::User,
        after: None,
        limit: 1000,
    };
    app.catch_up(mid, key, &[want]).await.expect("catch-up");
}

/// The offline rule: a push moves a device's position only when routed to a session of it that
/// is present where it is routed. Routed while present: given; routed after the disconnect or
/// the comet's purge (a stale index read), or to the comet the device left: owed.
#[tokio::test(start_paused = true)]
async fn a_push_moves_a_device_position_only_through_a_present_session() {
    let (app, _mem) = app(Config::default());
    let mid = 11;
    assert_eq!(connect(&app, "c1", mid, "k", "").await.offline_after, None);
    push_routed(&app, mid, "k", "c1").await;
    assert_eq!(app.offline_after(mid, "k").await.expect("read"), None);
    let p = job::mid_partition(mid, app.config.stream.partitions);
    let (_, first) = app.store.history.position(p, mid, "k").await.expect("read");
    app.disconnect(sref("c1", mid, "k"), first)
        .await
        .expect("disconnect");
    push_routed(&app, mid, "k", "c1").await;
    assert_eq!(app.offline_after(mid, "k").await.expect("read"), first);

    // Present on c2 now: a push routed there is given, one routed to c1 is not.
    let on_c2 = connect(&app, "c2", mid, "k", "").await;
    assert_eq!(on_c2.offline_after, first);
    catch_up(&app, mid, "k").await;
    push_routed(&app, mid, "k", "c1").await;
    assert!(app.offline_after(mid, "k").await.expect("read").is_some());
    catch_up(&app, mid, "k").await;
    push_routed(&app, mid, "k", "c2").await;
    assert_eq!(app.offline_after(mid, "k").await.expect("read"), None);

    // A purged comet's sessions are no longer present.
    app.unregister_node("c2".into()).await.expect("unregister");
    push_routed(&app, mid, "k", "c2").await;
    assert!(app.offline_after(mid, "k").await.expect("read").is_some());
}
