//! `deploy/container/compose.yaml` and its Dockerfile checked against the code they run, so
//! the files cannot drift from the binaries and configs: every image target is a Dockerfile
//! stage; every command is a built binary with a config file the image holds; every
//! environment variable is a config field of its tier (the tier's own loader, with the file's
//! environment, must accept it); every published port, health check, service address and
//! upstream names something that listens there; and the nginx conf it mounts passes `nginx -t`.
//!
//! There is no container engine in the test: what compose and Docker would do with the files is
//! read from them, and the configs are loaded by the tiers' own code.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

mod deploy_common;

use deploy_common::{
    Loaded, authority, dockerfile, host_of, load, port_of, source_in_repo, strings,
};
use rim_testkit::nginx::{Nginx, moved};
use rim_testkit::process::{binary, repo};
use serde_norway::Value;

/// What the test sets the file's required variables to (compose interpolates them).
const VARS: &[(&str, &str)] = &[
    (
        "RIM_CLUSTER_SECRET",
        "compose-test-cluster-secret-0123456789",
    ),
    ("RIM_PUSH_SECRET", "compose-test-push-secret"),
];

fn compose_dir() -> PathBuf {
    repo().join("deploy/container")
}

/// Compose's interpolation: `${NAME}`, `${NAME:-default}`, `${NAME:?message}` (an unset
/// `:?` variable is an error, as in compose), `$$` for a literal `$`.
fn interpolate(text: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(r) = rest.strip_prefix("$$") {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix("${") {
            let end = r.find('}').expect("unclosed ${");
            let expr = &r[..end];
            let (name, op) = match expr.find([':', '-', '?']) {
                Some(i) => (&expr[..i], &expr[i..]),
                None => (expr, ""),
            };
            let value = match (vars.get(name), op) {
                (Some(v), _) => (*v).to_string(),
                (None, op) if op.starts_with(":-") => op[2..].to_string(),
                (None, op) if op.starts_with(":?") => panic!("compose would refuse: {}", &op[2..]),
                (None, _) => String::new(),
            };
            out.push_str(&value);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

fn compose() -> Value {
    let text = std::fs::read_to_string(compose_dir().join("compose.yaml")).unwrap();
    let vars: HashMap<&str, &str> = VARS.iter().copied().collect();
    let mut v: Value = serde_norway::from_str(&interpolate(&text, &vars)).unwrap();
    v.apply_merge().unwrap();
    v
}

fn services(c: &Value) -> BTreeMap<String, Value> {
    c["services"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect()
}

fn env_of(svc: &Value) -> HashMap<String, String> {
    svc["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_norway::to_string(other).unwrap().trim().to_string(),
                    };
                    (k.as_str().unwrap().to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `"H:C"` published ports → the container ports.
fn container_ports(svc: &Value) -> Vec<u16> {
    strings(&svc["ports"])
        .iter()
        .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn the_compose_file_matches_the_binaries_configs_and_nginx() {
    let c = compose();
    let svcs = services(&c);
    let mut loaded: BTreeMap<String, (String, Loaded)> = BTreeMap::new();

    for (name, svc) in &svcs {
        // Every service is health-checked, and waits only for healthy services.
        assert!(
            !strings(&svc["healthcheck"]["test"]).is_empty(),
            "{name}: no healthcheck"
        );
        if let Some(deps) = svc["depends_on"].as_mapping() {
            for (dep, how) in deps {
                let dep = dep.as_str().unwrap();
                assert!(svcs.contains_key(dep), "{name} depends on unknown {dep}");
                assert_eq!(
                    how["condition"].as_str(),
                    Some("service_healthy"),
                    "{name} → {dep}"
                );
            }
        }
        let Some(build) = svc["build"].as_mapping().map(|_| &svc["build"]) else {
            continue;
        };

        // The image: a stage of the Dockerfile, built from the repository.
        let context = compose_dir().join(build["context"].as_str().unwrap());
        assert_eq!(
            context.canonicalize().unwrap(),
            repo().canonicalize().unwrap(),
            "{name}: build context"
        );
        let df_path = context.join(build["dockerfile"].as_str().unwrap());
        let df = dockerfile(&df_path);
        let target = build["target"].as_str().unwrap();
        let stage = df
            .stages
            .get(target)
            .unwrap_or_else(|| panic!("{name}: no stage {target} in the Dockerfile"));

        // The command: the stage's own, a built binary of this tier.
        let command = strings(&svc["command"]);
        assert_eq!(
            command, stage.cmd,
            "{name}: command differs from the image's CMD"
        );
        let tier = target;
        assert_eq!(command[0], format!("rim-{tier}"), "{name}: binary");
        assert!(binary(&command[0]).is_file(), "{} is not built", command[0]);

        // The config: what RIM_CONFIG names (the service's, else the image's), a file the image
        // holds; the command does not name another one.
        assert!(
            !command.contains(&"--config".to_string()),
            "{name}: --config beside RIM_CONFIG"
        );
        let env = env_of(svc);
        let config_path = env
            .get("RIM_CONFIG")
            .or_else(|| stage.env.get("RIM_CONFIG"))
            .unwrap_or_else(|| panic!("{name}: no RIM_CONFIG"));
        let config = source_in_repo(&df, config_path);
        assert!(config.is_file(), "{name}: {config_path} is not in config/");

        // Health: `--probe` with the same command (so the same config), in compose and image.
        let mut probe = command.clone();
        probe.push("--probe".into());
        assert_eq!(
            strings(&svc["healthcheck"]["test"]),
            [vec!["CMD".to_string()], probe.clone()].concat(),
            "{name}: healthcheck"
        );
        assert_eq!(stage.health, probe, "{target} stage HEALTHCHECK");

        // The environment: this tier's variables, accepted by the tier's loader.
        let prefix = format!("RIM_{}__", tier.to_uppercase());
        for k in env.keys() {
            assert!(
                k.starts_with(&prefix) || k == "RIM_CONFIG",
                "{name}: {k} is not a {tier} setting"
            );
        }
        let tier_env = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        let l = load(tier, &config, tier_env);

        // Published ports are ports the tier listens on.
        for port in container_ports(svc) {
            assert!(
                l.listen.iter().any(|a| port_of(a) == port),
                "{name}: publishes {port}, listens on {:?}",
                l.listen
            );
        }
        loaded.insert(name.clone(), (tier.to_string(), l));
    }

    let of_tier = |t: &str| -> Vec<(&String, &Loaded)> {
        loaded
            .iter()
            .filter(|(_, (tier, _))| tier == t)
            .map(|(n, (_, l))| (n, l))
            .collect()
    };
    assert_eq!(of_tier("logic").len(), 2, "logic x2");
    assert_eq!(of_tier("job").len(), 2, "job x2");
    assert_eq!(of_tier("comet").len(), 2, "comet x2");

    // Redis with AOF, and every tier pointed at it.
    let redis = &svcs["redis"];
    let cmd = strings(&redis["command"]).join(" ");
    assert!(cmd.contains("--appendonly yes"), "redis AOF: {cmd}");
    for (name, (_, l)) in &loaded {
        if !l.redis_url.is_empty() {
            assert_eq!(authority(&l.redis_url), "redis:6379", "{name}: redis url");
        }
    }

    // Comets: distinct server ids; logic addresses are the logic services' RPC ports; the RPC
    // address they advertise is their own; browsers are sent to nginx; nginx is a trusted proxy.
    let nginx = &svcs["nginx"];
    let nginx_ip = nginx["networks"]["default"]["ipv4_address"]
        .as_str()
        .unwrap();
    let nginx_port = strings(&nginx["ports"])[0]
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let mut ids = HashSet::new();
    for (name, l) in of_tier("comet") {
        // A descriptor per session: far past Docker's default soft limit of 1024.
        let nofile = &svcs[name.as_str()]["ulimits"]["nofile"]["soft"];
        assert!(
            nofile.as_u64().unwrap_or(0) >= 65536,
            "{name}: ulimits.nofile {nofile:?}"
        );
        assert!(ids.insert(l.server_id.clone()), "{name}: server_id repeats");
        for a in &l.logic_addrs {
            let (_, logic) = &loaded[host_of(a)];
            assert_eq!(port_of(a), port_of(&logic.rpc), "{name}: logic addr {a}");
        }
        assert_eq!(host_of(&l.advertise_rpc), name.as_str());
        assert_eq!(port_of(&l.advertise_rpc), port_of(&l.rpc));
        assert_eq!(l.advertise_ws, format!("localhost:{nginx_port}"));
        assert_eq!(l.trusted_proxies, [nginx_ip.to_string()]);
    }

    // nginx: the mounted files exist, its upstreams are the services' HTTP ports, its include is
    // where the snippet is mounted, it listens on the port compose publishes, and `nginx -t`.
    let mut mounts = HashMap::new();
    for v in strings(&nginx["volumes"]) {
        let mut parts = v.split(':');
        let (src, dst) = (parts.next().unwrap(), parts.next().unwrap());
        let src = compose_dir().join(src);
        assert!(src.is_file(), "nginx mounts missing {}", src.display());
        mounts.insert(dst.to_string(), src);
    }
    let site = std::fs::read_to_string(&mounts["/etc/nginx/conf.d/default.conf"]).unwrap();
    let snippet_at = "/etc/nginx/snippets/rim-locations.conf";
    assert!(site.contains(&format!("include {snippet_at};")));
    assert!(site.contains(&format!("listen {nginx_port};")));
    let mut upstream_hosts = Vec::new();
    for line in site.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("server ")
            && let Some(addr) = rest.split_whitespace().next().filter(|a| a.contains(':'))
        {
            let (_, l) = &loaded[host_of(addr)];
            assert_eq!(port_of(addr), port_of(&l.http), "nginx upstream {addr}");
            upstream_hosts.push(host_of(addr).to_string());
        }
    }
    assert_eq!(
        upstream_hosts.len(),
        4,
        "two comets and two logics behind nginx"
    );

    // The compose network's names do not resolve here: they become 127.0.0.1 for `nginx -t`.
    let mut moves: Vec<(String, String)> = upstream_hosts
        .iter()
        .map(|h| (format!("server {h}:"), "server 127.0.0.1:".to_string()))
        .collect();
    let conf = Nginx::prepare("");
    moves.push((
        format!("include {snippet_at};"),
        format!("include {};", conf.path("rim-locations.conf").display()),
    ));
    let moves: Vec<(&str, String)> = moves.iter().map(|(a, b)| (a.as_str(), b.clone())).collect();
    conf.write("site.conf", &moved("compose.conf", &site, &moves));
    conf.write(
        "rim-locations.conf",
        &std::fs::read_to_string(&mounts[snippet_at]).unwrap(),
    );
    conf.check().unwrap();
}

#[test]
fn an_unknown_variable_is_refused_by_the_loader_the_compose_check_uses() {
    // The check above would be empty if the loader ignored unknown variables.
    let env = HashMap::from([("RIM_JOB__STREAM__BOGUS".to_string(), "1".to_string())]);
    let err = rim_runtime::settings::load_with_env::<rim_job::Config>(
        Some(&repo().join("config/job.toml")),
        "job",
        rim_runtime::redis::LIST_KEYS,
        env,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
}

#[test]
fn interpolation_follows_compose() {
    let vars = HashMap::from([("A", "1")]);
    assert_eq!(interpolate("x${A}y", &vars), "x1y");
    assert_eq!(interpolate("${B:-d}", &vars), "d");
    assert_eq!(interpolate("$$A", &vars), "$A");
    let refused = std::panic::catch_unwind(|| interpolate("${B:?set B}", &HashMap::new()));
    assert!(refused.is_err());
}

#[test]
fn rim_config_names_the_config_for_the_command_and_the_probe() {
    // What the images rely on: RIM_CONFIG instead of --config, for the tier and its --probe.
    let run = |args: &[&str], config: &str| {
        std::process::Command::new(binary("rim-job"))
            .args(args)
            .env("RIM_CONFIG", config)
            .output()
            .unwrap()
    };
    let ok = run(
        &["--check"],
        repo().join("config/job.toml").to_str().unwrap(),
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let missing = run(&["--check"], "/nonexistent/job.toml");
    assert_eq!(missing.status.code(), Some(64));
    // --probe reads the same file: its listen.http, where nothing listens here.
    let probe = run(
        &["--probe"],
        repo().join("config/job.toml").to_str().unwrap(),
    );
    let said = String::from_utf8_lossy(&probe.stderr);
    assert_eq!(probe.status.code(), Some(1), "{said}");
    assert!(said.contains("127.0.0.1:3129"), "{said}");
}
