//! `docs/metrics.md` against the running tiers: each tier's `/metrics` parses as Prometheus
//! text (format 0.0.4, strictly: names, labels, escapes, values, one TYPE per family before its
//! samples, no repeated series); every metric a tier exposes is documented under that tier (or
//! under "every tier") and every documented metric is exposed; and each counter the doc marks
//! `moves` on a push increases when one HTTP push reaches one WebSocket client.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rim_proto::msg::AuthBody;
use rim_testkit::api::{Api, eventually};
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{self, CometAddrs, free_addr, repo};
use rim_testkit::redis::RedisServer;

const WAIT: Duration = Duration::from_secs(20);

/// One row of a tier's table in docs/metrics.md.
#[derive(Debug)]
struct Documented {
    section: String,
    name: String,
    /// `counter` or `gauge`.
    kind: String,
    /// Label → its values, where the doc lists them (`partition`: "partition number" lists none).
    labels: BTreeMap<String, Option<BTreeSet<String>>>,
    /// `Some(label selector)` when the row says `moves` (`None` inside = the unlabelled series).
    moves: Option<Option<(String, String)>>,
}

fn documented() -> Vec<Documented> {
    let text = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let mut section = String::new();
    let mut rows = Vec::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("## ") {
            section = s.trim().to_string();
            continue;
        }
        let cells: Vec<&str> = line
            .split(" | ")
            .map(|c| c.trim_matches('|').trim())
            .collect();
        if cells.len() != 5 || !cells[0].starts_with('`') {
            continue;
        }
        let name = cells[0].trim_matches('`').to_string();
        let moves = (cells[3] == "moves").then(|| {
            // "`kind`: `keys`, `mids`; `kind="mids"` moves" names the series that moves.
            cells[2].split('`').find_map(|part| {
                let (k, v) = part.split_once("=\"")?;
                Some((k.to_string(), v.trim_end_matches('"').to_string()))
            })
        });
        let mut labels = BTreeMap::new();
        for part in cells[2].split(';').map(str::trim) {
            // "`reason`: `a`, `b`" lists values; "`partition`: partition number" does not.
            let Some((label, values)) = part.split_once(':') else {
                continue;
            };
            let label = label.trim().trim_matches('`').to_string();
            let listed: BTreeSet<String> = values
                .split(',')
                .map(str::trim)
                .filter(|v| v.starts_with('`') && v.ends_with('`'))
                .map(|v| v.trim_matches('`').to_string())
                .collect();
            labels.insert(label, (!listed.is_empty()).then_some(listed));
        }
        rows.push(Documented {
            section: section.clone(),
            name,
            kind: cells[1].to_string(),
            labels,
            moves,
        });
    }
    assert!(rows.len() > 40, "docs/metrics.md tables not found");
    rows
}

/// A series: name and sorted labels.
type Series = (String, BTreeMap<String, String>);

/// Parses Prometheus text exposition 0.0.4, failing on anything malformed. Returns the families
/// (name → type) and the samples.
fn parse_exposition(text: &str) -> (BTreeMap<String, String>, BTreeMap<Series, f64>) {
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            match words.next() {
                Some("TYPE") => {
                    let name = words.next().unwrap_or_default();
                    let kind = words.next().unwrap_or_default();
                    assert!(valid_name(name), "bad family name, {}", at());
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "bad type, {}",
                        at()
                    );
                    assert!(
                        types.insert(name.to_string(), kind.to_string()).is_none(),
                        "second TYPE, {}",
                        at()
                    );
                }
                Some("HELP") => assert!(valid_name(words.next().unwrap_or_default()), "{}", at()),
                _ => {}
            }
            continue;
        }
        assert!(!line.starts_with('#'), "comment without a space, {}", at());
        let (name, labels, value) = match line.find('{') {
            Some(open) => {
                let close = line
                    .rfind('}')
                    .unwrap_or_else(|| panic!("unclosed labels, {}", at()));
                (
                    &line[..open],
                    parse_labels(&line[open + 1..close], &at()),
                    line[close + 1..].trim(),
                )
            }
            None => {
                let (name, value) = line
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("no value, {}", at()));
                (name, BTreeMap::new(), value.trim())
            }
        };
        assert!(valid_name(name), "bad metric name, {}", at());
        let value = value.split(' ').next().unwrap();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().unwrap_or_else(|_| panic!("bad value, {}", at())),
        };
        assert!(types.contains_key(name), "sample before its TYPE, {}", at());
        assert!(
            samples.insert((name.to_string(), labels), value).is_none(),
            "repeated series, {}",
            at()
        );
    }
    (types, samples)
}

/// `a="x",b="y\"z"` → labels, with the exposition's escapes (`\\`, `\"`, `\n`).
fn parse_labels(text: &str, at: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label, {at}"));
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => panic!("bad escape, {at}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value, {at}"),
            }
        };
        assert!(
            out.insert(name.to_string(), value).is_none(),
            "repeated label, {at}"
        );
        rest = after[end + 1..].trim_start_matches(',');
    }
    out
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let kind = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    r.text().await.unwrap()
}

/// The value of the documented series (summed over labels the selector does not fix).
fn value_of(samples: &BTreeMap<Series, f64>, name: &str, sel: &Option<(String, String)>) -> f64 {
    samples
        .iter()
        .filter(|((n, labels), _)| {
            n == name && sel.as_ref().is_none_or(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_match_the_doc_and_the_documented_counters_move_on_a_push() {
    let redis = RedisServer::start();
    let (http, rpc, job_http) = (free_addr(), free_addr(), free_addr());
    let _logic = process::logic(&redis.url(), http, rpc, &[]);
    let _job = process::job(&redis.url(), job_http, &[]);
    let c = CometAddrs::free();
    let _comet = process::comet("metrics-comet", c, rpc, &[]);
    let api = Api::new(http);
    api.wait_live_nodes(1, WAIT).await.unwrap();
    let tiers = [("comet", c.ops), ("logic", http), ("job", job_http)];
    let doc = documented();

    let scrape_all = || async {
        let mut out = BTreeMap::new();
        for (tier, addr) in tiers {
            out.insert(tier, parse_exposition(&scrape(addr).await));
        }
        out
    };
    let before = scrape_all().await;

    // Exposed ⊆ documented (under the tier or "every tier"), and documented ⊆ exposed.
    let mut every_tier_seen = BTreeSet::new();
    for (tier, (types, _)) in &before {
        for family in types.keys() {
            let here = doc.iter().find(|d| &d.name == family && d.section == *tier);
            let shared = doc
                .iter()
                .find(|d| &d.name == family && d.section == "every tier");
            assert!(
                here.is_some() || shared.is_some(),
                "{tier} exposes {family}, which docs/metrics.md does not document under {tier}"
            );
            if shared.is_some() {
                every_tier_seen.insert(family.clone());
            }
        }
        for d in doc.iter().filter(|d| d.section == *tier) {
            assert!(
                types.contains_key(&d.name),
                "docs/metrics.md documents {} under {tier}; {tier} does not expose it",
                d.name
            );
        }
        // Types and label values as documented (labels the doc lists values for).
        let (types, samples) = &before[tier];
        for (family, kind) in types {
            let Some(d) = doc
                .iter()
                .find(|d| &d.name == family && (d.section == *tier || d.section == "every tier"))
            else {
                continue;
            };
            assert_eq!(&d.kind, kind, "{family}: type in docs/metrics.md");
            let mut exposed: BTreeMap<&String, BTreeSet<String>> = BTreeMap::new();
            for ((_, labels), _) in samples.iter().filter(|((n, _), _)| n == family) {
                for (k, v) in labels {
                    exposed.entry(k).or_default().insert(v.clone());
                    assert!(
                        d.labels.contains_key(k),
                        "{family}: label {k} is not in docs/metrics.md"
                    );
                }
            }
            for (label, listed) in &d.labels {
                if let Some(listed) = listed {
                    assert_eq!(
                        exposed.get(label),
                        Some(listed),
                        "{family}{{{label}}}: values in docs/metrics.md"
                    );
                }
            }
        }
    }
    for d in doc.iter().filter(|d| d.section == "every tier") {
        assert!(
            every_tier_seen.contains(&d.name),
            "no tier exposes {}",
            d.name
        );
    }

    // One push to one WebSocket client.
    let mid = 9191;
    let auth = AuthBody {
        mid,
        accepts: vec![1000],
        platform: "web".into(),
        ..Default::default()
    };
    let mut client = Conn::connect(Transport::WsBinary, c.http, &auth)
        .await
        .unwrap();
    api.push_mids(1000, &[mid], b"counted").await.unwrap();
    let got = client.recv_push().await.unwrap();
    assert_eq!(&got.frame.body[..], b"counted");

    let moving: Vec<&Documented> = doc.iter().filter(|d| d.moves.is_some()).collect();
    assert!(!moving.is_empty(), "the doc marks no counter as moving");
    for d in &moving {
        let sel = d.moves.clone().unwrap();
        let tier = d.section.as_str();
        let (_, old) = &before[tier];
        let was = value_of(old, &d.name, &sel);
        let addr = tiers.iter().find(|(t, _)| *t == tier).unwrap().1;
        // Job counts after the comet's reply and XACK, a moment after the client has it.
        eventually(
            &format!("{} {sel:?} to move past {was}", d.name),
            WAIT,
            || async {
                let (_, now) = parse_exposition(&scrape(addr).await);
                (value_of(&now, &d.name, &sel) > was).then_some(())
            },
        )
        .await
        .unwrap();
    }
}

#[test]
fn the_parser_refuses_malformed_expositions() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"v\\\"w\"} 3\n";
    let (_, s) = parse_exposition(ok);
    assert_eq!(s.len(), 1);
    for bad in [
        "a_total 1\n",                          // no TYPE
        "# TYPE a counter\n# TYPE a counter\n", // second TYPE
        "# TYPE a counter\na{k=\"v} 1\n",       // unterminated
        "# TYPE a counter\na 1\na 2\n",         // repeated series
        "# TYPE a counter\na one\n",            // bad value
        "# TYPE 1a counter\n",                  // bad name
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_exposition(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}
