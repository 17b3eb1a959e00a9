//! The systemd units in `deploy/systemd/` as an operator gets them: `systemd-analyze verify`
//! accepts every unit and `systemd-analyze security` scores it well (both skipped, with a
//! message, where systemd's tools are absent); `install.sh` staged into a directory installs
//! binaries, units, example configs and secrets; the tiers started with exactly the staged
//! units' `ExecStart` lines and environment files carry a push end to end, and each drains
//! cleanly on SIGTERM within the unit's `TimeoutStopSec`; a bad config exits with the status
//! the units name in `RestartPreventExitStatus`, so systemd does not restart it in a loop.
//!
//! systemd itself is not running in the test (no PID 1 here), so the sandboxing directives are
//! checked by `systemd-analyze`, not exercised.
//!
//! Needs `cargo build --bins` first (scripts/test.sh does it).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rim_proto::msg::AuthBody;
use rim_testkit::api::Api;
use rim_testkit::client::{Conn, Transport};
use rim_testkit::process::{Proc, binary, free_addr, repo};
use rim_testkit::redis::RedisServer;

/// The units shipped, and the instance templated ones are checked with ("" for a plain unit).
const UNITS: &[(&str, &str)] = &[
    ("rim-logic.service", ""),
    ("rim-comet@.service", "a"),
    ("rim-job@.service", "a"),
];

/// `rim-comet@.service` with instance `a` is `rim-comet@a.service`.
fn unit_name(file: &str, instance: &str) -> String {
    file.replace("@.", &format!("@{instance}."))
}

/// Highest `systemd-analyze security` exposure accepted (0 = locked down, 10 = unprotected;
/// below 3 is rated "OK").
const MAX_EXPOSURE: f64 = 2.5;

/// The `[Service]` entries of a unit file, in order (a key may repeat).
fn service_entries(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

fn entries<'a>(unit: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    unit.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn the_entry<'a>(unit: &'a [(String, String)], key: &str) -> &'a str {
    let e = entries(unit, key);
    assert_eq!(e.len(), 1, "one {key}= expected: {e:?}");
    e[0]
}

fn bin_dir() -> PathBuf {
    binary("rim-logic").parent().unwrap().to_path_buf()
}

fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: systemd-analyze is not installed (Debian: apt-get install systemd)");
    }
    found.then_some("systemd-analyze")
}

#[test]
fn every_unit_passes_systemd_analyze_verify_and_is_hardened() {
    let Some(sa) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (file, instance) in UNITS {
        let instance = &unit_name(file, instance);
        // The binaries are not installed on the test machine: verify checks that ExecStart's
        // program exists, so it points at the built ones. Nothing else is changed.
        let text = std::fs::read_to_string(repo().join("deploy/systemd").join(file)).unwrap();
        let text = text.replace("/usr/local/bin/", &format!("{}/", bin_dir().display()));
        let path = dir.path().join(instance);
        std::fs::write(&path, text).unwrap();

        let out = Command::new(sa).arg("verify").arg(&path).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{instance}: verify failed: {said}");
        assert!(said.trim().is_empty(), "{instance}: verify warned: {said}");

        let out = Command::new(sa)
            .args(["security", "--offline=yes"])
            .arg(&path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let exposure: f64 = report
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")
            })
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{instance}: no exposure level in: {report}"));
        assert!(
            exposure <= MAX_EXPOSURE,
            "{instance}: exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
        );
    }
}

/// A staged install: `DESTDIR=<dir> deploy/systemd/install.sh --from <built binaries>`.
struct Stage {
    dir: tempfile::TempDir,
}

impl Stage {
    fn install() -> Stage {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(repo().join("deploy/systemd/install.sh"))
            .arg("--from")
            .arg(bin_dir())
            .env("DESTDIR", dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Stage { dir }
    }

    /// An absolute path of the installed system, inside the stage.
    fn path(&self, abs: &str) -> PathBuf {
        self.dir.path().join(abs.trim_start_matches('/'))
    }

    /// The installed unit `file`'s `[Service]` entries, with `%i` = `instance`.
    fn unit(&self, file: &str, instance: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.path(&format!("/etc/systemd/system/{file}")))
            .unwrap()
            .replace("%i", instance)
            .replace("%H", "testhost");
        service_entries(&text)
    }

    /// A unit's command line with its installed paths moved into the stage.
    fn command(&self, line: &str) -> Command {
        let words: Vec<PathBuf> = line
            .split_whitespace()
            .map(|w| {
                if w.starts_with("/usr/local/bin/") || w.starts_with("/etc/rim/") {
                    self.path(w)
                } else {
                    PathBuf::from(w)
                }
            })
            .collect();
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd
    }

    /// The environment the unit's `Environment=` and `EnvironmentFile=` lines give (files
    /// after, later files win); a `-` prefix means optional, as in systemd.
    fn environment(&self, unit: &[(String, String)]) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for set in entries(unit, "Environment") {
            let (k, v) = set.split_once('=').unwrap();
            env.insert(k.to_string(), v.to_string());
        }
        for file in entries(unit, "EnvironmentFile") {
            let (optional, file) = match file.strip_prefix('-') {
                Some(f) => (true, f),
                None => (false, file),
            };
            let Ok(text) = std::fs::read_to_string(self.path(file)) else {
                assert!(optional, "required {file} missing");
                continue;
            };
            for line in text.lines().map(str::trim) {
                if let Some((k, v)) = line.split_once('=').filter(|_| !line.starts_with('#')) {
                    env.insert(k.to_string(), v.to_string());
                }
            }
        }
        env
    }

    /// Runs the unit's `ExecStartPre` lines if any (each must succeed), then starts its `ExecStart`, as systemd
    /// would, with `RUST_LOG=info` so the drain is logged.
    fn start(&self, file: &str, instance: &str) -> (Proc, Duration) {
        let unit = self.unit(file, instance);
        let env = self.environment(&unit);
        for pre in entries(&unit, "ExecStartPre") {
            let out = self.command(pre).envs(&env).output().unwrap();
            assert!(
                out.status.success(),
                "{file} ExecStartPre {pre}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut env: Vec<(&str, String)> =
            env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        env.push(("RUST_LOG", "info".into()));
        let exec = self.command(the_entry(&unit, "ExecStart"));
        let stop: u64 = the_entry(&unit, "TimeoutStopSec").parse().unwrap();
        (
            Proc::start(format!("{file}({instance})"), exec, &env),
            Duration::from_secs(stop),
        )
    }

    fn write(&self, abs: &str, text: &str) {
        std::fs::write(self.path(abs), text).unwrap();
    }
}

/// SIGTERM, then a zero exit within the unit's `TimeoutStopSec`, having logged `said`.
fn drains(p: &mut Proc, stop: Duration, said: &str) {
    p.signal("TERM");
    let status = p.wait_exit(stop);
    let log = p.log_text();
    assert!(
        status.success(),
        "{}: {status} after SIGTERM:\n{log}",
        p.name
    );
    assert!(log.contains(said), "{}: no {said:?} in:\n{log}", p.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_exec_start_lines_run_a_cluster_that_pushes_and_drains() {
    let stage = Stage::install();
    for tier in ["logic", "comet", "job"] {
        assert!(stage.path(&format!("/usr/local/bin/rim-{tier}")).is_file());
    }
    for (file, _) in UNITS {
        assert!(stage.path(&format!("/etc/systemd/system/{file}")).is_file());
    }
    // Secrets and configs are readable by the tiers' group only.
    for file in [
        "/etc/rim/secrets.env",
        "/etc/rim/logic-secrets.env",
        "/etc/rim/logic.toml",
        "/etc/rim/comet/a.toml",
        "/etc/rim/job/a.toml",
    ] {
        let mode = std::fs::metadata(stage.path(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o640, "{file} mode {mode:o}");
    }
    // logic's push, auth and admin secrets reach logic only.
    for (file, instance) in UNITS {
        let env = stage.environment(&stage.unit(file, instance));
        let has = env.contains_key("RIM_LOGIC__PUSH__SECRET");
        assert_eq!(
            has,
            file.starts_with("rim-logic"),
            "{file} and logic's secrets"
        );
        assert!(
            env.keys().any(|k| k.ends_with("__CLUSTER__SECRET")),
            "{file}"
        );
        assert_eq!(env.get("HOSTNAME").map(String::as_str), Some("testhost"));
    }
    let secrets = stage.path("/etc/rim/logic-secrets.env");
    // Re-running keeps the operator's files (and so the secrets).
    let before = std::fs::read_to_string(&secrets).unwrap();
    let again = Command::new(repo().join("deploy/systemd/install.sh"))
        .args(["--from".as_ref(), bin_dir().as_os_str()])
        .env("DESTDIR", stage.dir.path())
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("keeping"));
    assert_eq!(std::fs::read_to_string(&secrets).unwrap(), before);

    // This host's addresses go in the optional environment files the units read, as an operator
    // would set them; the configs are the installed examples, unchanged.
    let redis = RedisServer::start();
    let (http, rpc, job_http) = (free_addr(), free_addr(), free_addr());
    let (ws, tcp, comet_rpc, ops) = (free_addr(), free_addr(), free_addr(), free_addr());
    stage.write(
        "/etc/rim/logic.env",
        &format!(
            "RIM_LOGIC__REDIS__URL={}\nRIM_LOGIC__LISTEN__HTTP={http}\nRIM_LOGIC__LISTEN__RPC={rpc}\n",
            redis.url()
        ),
    );
    stage.write(
        "/etc/rim/job/a.env",
        &format!(
            "RIM_JOB__REDIS__URL={}\nRIM_JOB__LISTEN__HTTP={job_http}\n",
            redis.url()
        ),
    );
    stage.write(
        "/etc/rim/comet/a.env",
        &format!(
            "RIM_COMET__LOGIC__ADDRS={rpc}\nRIM_COMET__LISTEN__HTTP={ws}\n\
             RIM_COMET__LISTEN__TCP={tcp}\nRIM_COMET__LISTEN__RPC={comet_rpc}\n\
             RIM_COMET__LISTEN__OPS={ops}\n"
        ),
    );
    let env = stage.environment(&stage.unit("rim-logic.service", ""));
    let push_secret = env["RIM_LOGIC__PUSH__SECRET"].clone();
    let auth_secret = env["RIM_LOGIC__AUTH__SECRET"].clone();

    let (mut logic, logic_stop) = stage.start("rim-logic.service", "");
    let (mut job, job_stop) = stage.start("rim-job@.service", "a");
    let (mut comet, comet_stop) = stage.start("rim-comet@.service", "a");
    let api = Api::new(http).with_secret(&push_secret);
    api.wait_live_nodes(1, Duration::from_secs(20))
        .await
        .unwrap();

    // `--probe` (the containers' health check) on each unit's own command line says ready.
    for (file, instance) in UNITS {
        let unit = stage.unit(file, instance);
        let out = stage
            .command(the_entry(&unit, "ExecStart"))
            .arg("--probe")
            .envs(stage.environment(&unit))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file} --probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // A client with a token signed by the generated auth secret, and a push with the generated
    // push secret, end to end.
    let mid = 4242;
    let token = rim_logic::auth::issue_token(&auth_secret, mid, Duration::from_secs(3600));
    let auth = AuthBody {
        mid,
        accepts: vec![1000],
        platform: "web".into(),
        token,
        ..Default::default()
    };
    let mut client = Conn::connect(Transport::WsBinary, ws, &auth).await.unwrap();
    api.push_mids(1000, &[mid], b"through the units")
        .await
        .unwrap();
    let got = client.recv_push().await.unwrap();
    assert_eq!(&got.frame.body[..], b"through the units");

    // The comet drains first (its client is told to go), then job, then logic.
    drains(&mut comet, comet_stop, "comet stopped");
    client.expect_closed().await.unwrap();
    drains(&mut job, job_stop, "drained");
    drains(&mut logic, logic_stop, "drained");
}

#[test]
fn the_staged_tree_has_the_paths_the_units_name() {
    let stage = Stage::install();
    for (file, instance) in UNITS {
        let unit = stage.unit(file, instance);
        for line in entries(&unit, "ExecStart")
            .into_iter()
            .chain(entries(&unit, "ExecStartPre"))
        {
            for word in line
                .split_whitespace()
                .filter(|w| w.starts_with("/usr/local/bin/") || w.starts_with("/etc/rim/"))
            {
                assert!(
                    Path::new(&stage.path(word)).exists(),
                    "{file}: {word} is not installed by install.sh"
                );
            }
        }
    }
}

#[test]
fn the_comet_unit_has_a_descriptor_for_every_session_the_example_allows() {
    let stage = Stage::install();
    let unit = stage.unit("rim-comet@.service", "a");
    let nofile: u64 = the_entry(&unit, "LimitNOFILE").parse().unwrap();
    let config = std::fs::read_to_string(stage.path("/etc/rim/comet/a.toml")).unwrap();
    let mut section = "";
    let mut max_connections = None;
    for line in config.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section == "[session]"
            && let Some(v) = line.strip_prefix("max_connections = ")
        {
            max_connections = v.parse::<u64>().ok();
        }
    }
    let sessions = max_connections.expect("session.max_connections in the comet example");
    // One descriptor per session, plus listeners, RPC, Redis and room to spare.
    assert!(
        nofile >= sessions * 2,
        "LimitNOFILE={nofile} for {sessions} sessions"
    );
}

#[test]
fn a_bad_config_exits_with_the_status_the_units_do_not_restart_on() {
    let stage = Stage::install();
    // One invalid field per tier, on top of everything the unit gives (secrets included), so
    // the refusal is that field's and not a missing secret's.
    let bad = [
        (
            "rim-logic.service",
            "RIM_LOGIC__PUSH__BODY_LIMIT",
            "push.body_limit",
        ),
        (
            "rim-comet@.service",
            "RIM_COMET__SESSION__MAX_CONNECTIONS",
            "session.max_connections",
        ),
        (
            "rim-job@.service",
            "RIM_JOB__STREAM__PARTITIONS",
            "stream.partitions",
        ),
    ];
    for (file, instance) in UNITS {
        let unit = stage.unit(file, instance);
        let no_restart: i32 = the_entry(&unit, "RestartPreventExitStatus")
            .parse()
            .unwrap();
        let (_, var, field) = bad.iter().find(|(f, _, _)| f == file).unwrap();
        let out = stage
            .command(the_entry(&unit, "ExecStart"))
            .envs(stage.environment(&unit))
            .env(var, "0")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(no_restart), "{file}: {said}");
        assert!(
            said.contains(&format!("config error: {field}:")),
            "{file}: {said}"
        );
    }
}
