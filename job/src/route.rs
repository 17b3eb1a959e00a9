//! Routing: turns a batch of decoded stream entries into one ordered delivery list per comet.
//!
//! Pure (no I/O) so the ordering rules are unit-tested: each comet's list keeps stream order,
//! every item carries its entry's `PushId`, and comets that are not live are reported as drops
//! instead of being sent to.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rim_proto::job::{PushJob, Route};
use rim_proto::rpc::{DeliverTarget, Delivery, PushId};

/// One decoded stream entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its position (partition + stream id).
    pub id: PushId,
    /// The push.
    pub job: PushJob,
}

/// A delivery skipped because its comet is not live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Message id of the push.
    pub msg_id: String,
    /// The comet it was meant for.
    pub server: String,
    /// Whether it was addressed by name (sessions, kick) rather than found through a room set;
    /// only the former is worth a warning (stale room sets are expected).
    pub addressed: bool,
}

/// Per-comet delivery lists of one batch.
#[derive(Debug, Default)]
pub struct Plan {
    /// Comet server id → its items in stream order.
    pub per_comet: BTreeMap<String, Vec<Delivery>>,
    /// Skipped deliveries.
    pub dropped: Vec<Dropped>,
}

/// Builds the plan for `entries` (in stream order).
///
/// `live` is the set of live comets; `rooms` maps a room id to the comets in its `rim:room:{room}`
/// set (rooms absent from the map have no comets).
pub fn plan(
    entries: &[Entry],
    live: &BTreeSet<String>,
    rooms: &HashMap<String, Vec<String>>,
) -> Plan {
    let mut out = Plan::default();
    for entry in entries {
        let job = &entry.job;
        let mut push = |server: &str, target: DeliverTarget, addressed: bool| {
            if live.contains(server) {
                out.per_comet
                    .entry(server.to_owned())
                    .or_default()
                    .push(Delivery {
                        id: entry.id,
                        op: job.op,
                        body: job.body.clone(),
                        target,
                        exclude: job.exclude.clone(),
                        recorded: job.recorded,
                    });
            } else {
                out.dropped.push(Dropped {
                    msg_id: job.msg_id.clone(),
                    server: server.to_owned(),
                    addressed,
                });
            }
        };
        match &job.route {
            Route::Sessions(list) => {
                for sk in list {
                    push(&sk.server, DeliverTarget::Keys(sk.keys.clone()), true);
                }
            }
            Route::Kick {
                server,
                key,
                since_ms,
            } => push(
                server,
                DeliverTarget::Kick {
                    key: key.clone(),
                    since_ms: *since_ms,
                },
                true,
            ),
            Route::Room(room) => {
                // A set has no duplicates, but be robust against a caller passing some.
                let servers: BTreeSet<&String> = rooms
                    .get(room.as_str())
                    .map(|v| v.iter().collect())
                    .unwrap_or_default();
                for server in servers {
                    push(server, DeliverTarget::Room(room.clone()), false);
                }
            }
            Route::All { speed } => {
                for server in live {
                    push(server, DeliverTarget::All { speed: *speed }, false);
                }
            }
        }
    }
    out
}

/// Rooms addressed by `entries`, each once.
pub fn rooms_of(entries: &[Entry]) -> BTreeSet<String> {
    entries
        .iter()
        .filter_map(|e| match &e.job.route {
            Route::Room(r) => Some(r.as_str().to_owned()),
            _ => None,
        })
        .collect()
}

/// Whether an entry is a room push.
pub fn is_room(e: &Entry) -> bool {
    matches!(e.job.route, Route::Room(_))
}

/// The most messages any single room has in these entries.
pub fn largest_room_run(entries: &[Entry]) -> usize {
    let mut per_room: HashMap<&str, usize> = HashMap::new();
    for e in entries {
        if let Route::Room(room) = &e.job.route {
            *per_room.entry(room.as_str()).or_default() += 1;
        }
    }
    per_room.into_values().max().unwrap_or(0)
}

/// Servers addressed by name (sessions, kicks) in `entries`.
pub fn named_servers(entries: &[Entry]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in entries {
        match &e.job.route {
            Route::Sessions(list) => out.extend(list.iter().map(|sk| sk.server.clone())),
            Route::Kick { server, .. } => {
                out.insert(server.clone());
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use rim_proto::job::ServerKeys;
    use rim_proto::room::RoomId;

    fn entry(seq: u64, route: Route) -> Entry {
        Entry {
            id: PushId {
                partition: 3,
                ms: 100,
                seq,
            },
            job: PushJob {
                msg_id: format!("m{seq}"),
                op: 1000,
                body: Bytes::from(format!("b{seq}")),
                route,
                accepted_ms: 1,
                exclude: None,
                // Every other entry is recorded in a history: the flag reaches the comets.
                recorded: seq.is_multiple_of(2),
            },
        }
    }

    fn sk(server: &str, keys: &[&str]) -> ServerKeys {
        ServerKeys {
            server: server.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn live(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sessions_and_kicks_keep_stream_order_per_comet() {
        let entries = vec![
            entry(0, Route::Sessions(vec![sk("a", &["k1"]), sk("b", &["k2"])])),
            entry(
                1,
                Route::Kick {
                    server: "a".into(),
                    key: "k1".into(),
                    since_ms: 42,
                },
            ),
            entry(2, Route::Sessions(vec![sk("b", &["k3", "k4"])])),
        ];
        let p = plan(&entries, &live(&["a", "b"]), &HashMap::new());
        assert!(p.dropped.is_empty());
        let a = &p.per_comet["a"];
        assert_eq!(a.iter().map(|d| d.id.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(
            a.iter().map(|d| d.recorded).collect::<Vec<_>>(),
            vec![true, false]
        );
        assert_eq!(a[0].target, DeliverTarget::Keys(vec!["k1".into()]));
        assert_eq!(
            a[1].target,
            DeliverTarget::Kick {
                key: "k1".into(),
                since_ms: 42
            }
        );
        let b = &p.per_comet["b"];
        assert_eq!(b.iter().map(|d| d.id.seq).collect::<Vec<_>>(), vec![0, 2]);
        assert_eq!(
            b[1].target,
            DeliverTarget::Keys(vec!["k3".into(), "k4".into()])
        );
        assert_eq!(b[1].body, Bytes::from("b2"));
        assert_eq!(b[1].id.partition, 3);
    }

    #[test]
    fn rooms_go_to_live_room_members_only_and_all_to_every_live_comet() {
        let room = RoomId::parse("live://1").expect("room");
        let entries = vec![
            entry(0, Route::Room(room.clone())),
            entry(1, Route::All { speed: 7 }),
        ];
        let rooms = HashMap::from([(
            "live://1".to_string(),
            vec!["a".to_string(), "dead".to_string()],
        )]);
        let p = plan(&entries, &live(&["a", "b"]), &rooms);
        assert_eq!(
            p.per_comet["a"]
                .iter()
                .map(|d| d.target.clone())
                .collect::<Vec<_>>(),
            vec![DeliverTarget::Room(room), DeliverTarget::All { speed: 7 }]
        );
        assert_eq!(
            p.per_comet["b"]
                .iter()
                .map(|d| d.id.seq)
                .collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(
            p.dropped,
            vec![Dropped {
                msg_id: "m0".into(),
                server: "dead".into(),
                addressed: false
            }]
        );
    }

    #[test]
    fn unknown_servers_are_dropped() {
        let entries = vec![entry(0, Route::Sessions(vec![sk("gone", &["k"])]))];
        let p = plan(&entries, &live(&["a"]), &HashMap::new());
        assert!(p.per_comet.is_empty());
        assert_eq!(p.dropped.len(), 1);
        assert!(p.dropped[0].addressed);
        assert_eq!(named_servers(&entries), live(&["gone"]));
    }

    #[test]
    fn kicks_go_to_the_named_comet_only_and_count_as_addressed() {
        let entries = vec![entry(
            0,
            Route::Kick {
                server: "old".into(),
                key: "k".into(),
                since_ms: 7,
            },
        )];
        assert_eq!(named_servers(&entries), live(&["old"]));
        let p = plan(&entries, &live(&["a", "old"]), &HashMap::new());
        assert_eq!(p.per_comet.len(), 1);
        assert_eq!(
            p.per_comet["old"][0].target,
            DeliverTarget::Kick {
                key: "k".into(),
                since_ms: 7
            }
        );
        let p = plan(&entries, &live(&["a"]), &HashMap::new());
        assert!(p.per_comet.is_empty());
        assert!(p.dropped[0].addressed);
    }

    /// The room batch reads on while no room has `room_batch.max` messages: the run it measures is
    /// per room (two rooms do not add up) and counts room pushes only.
    #[test]
    fn the_largest_room_run_counts_each_rooms_pushes_apart() {
        let a = RoomId::parse("live://a").expect("room");
        let b = RoomId::parse("live://b").expect("room");
        let user = entry(9, Route::Sessions(vec![sk("s", &["k"])]));
        assert_eq!(largest_room_run(&[]), 0);
        assert_eq!(largest_room_run(std::slice::from_ref(&user)), 0);
        assert!(!is_room(&user));
        assert!(!is_room(&entry(8, Route::All { speed: 0 })));
        let entries = vec![
            entry(0, Route::Room(a.clone())),
            user,
            entry(1, Route::Room(b)),
            entry(2, Route::Room(a.clone())),
            entry(3, Route::Room(a)),
        ];
        assert!(is_room(&entries[0]));
        assert_eq!(largest_room_run(&entries), 3);
        assert_eq!(largest_room_run(&entries[..3]), 1);
    }
}
