//! What the deployment tests share: the Dockerfile as Docker reads it (stages, their `CMD` and
//! `HEALTHCHECK`, what `COPY` puts where) and a tier's config loaded by the tier's own code from a
//! config file and an environment given as data, as a deployment file gives it.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use rim_testkit::process::repo;

pub fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().0
}

/// `scheme://[user@]host:port/path` → `host:port`.
pub fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split('/').next().unwrap();
    rest.rsplit('@').next().unwrap()
}

/// One stage of the Dockerfile: its `CMD` and `HEALTHCHECK ... CMD` (JSON arrays) and its `ENV`
/// (inherited from the stage it is built `FROM`).
#[derive(Debug, Clone, Default)]
pub struct Stage {
    pub cmd: Vec<String>,
    pub health: Vec<String>,
    pub env: HashMap<String, String>,
}

/// The Dockerfile's stages by name, and the `COPY src dst` lines of every stage.
pub struct Dockerfile {
    pub stages: BTreeMap<String, Stage>,
    pub copies: Vec<(String, String)>,
}

pub fn dockerfile(path: &std::path::Path) -> Dockerfile {
    let text = std::fs::read_to_string(path).unwrap();
    // Continuation lines joined, comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let mut stages: BTreeMap<String, Stage> = BTreeMap::new();
    let mut copies = Vec::new();
    let mut stage = String::new();
    let json_after = |line: &str, key: &str| -> Vec<String> {
        let at = line.find(key).unwrap() + key.len();
        serde_json::from_str(line[at..].trim()).unwrap()
    };
    for line in joined.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("FROM") => {
                let base = stages.get(words[1]).cloned().unwrap_or_default();
                stage = words.last().unwrap().to_string();
                stages.insert(stage.clone(), base);
            }
            Some("CMD") => stages.get_mut(&stage).unwrap().cmd = json_after(line, "CMD"),
            Some("HEALTHCHECK") => {
                stages.get_mut(&stage).unwrap().health = json_after(line, " CMD ");
            }
            Some("ENV") => {
                let (k, v) = words[1].split_once('=').unwrap();
                stages
                    .get_mut(&stage)
                    .unwrap()
                    .env
                    .insert(k.to_string(), v.to_string());
            }
            Some("COPY") if !line.contains("--from") => {
                copies.push((words[1].to_string(), words[2].to_string()));
            }
            _ => {}
        }
    }
    Dockerfile { stages, copies }
}

/// The repository file a path in the image comes from (through a `COPY dir/ /dst/` line).
pub fn source_in_repo(df: &Dockerfile, image_path: &str) -> PathBuf {
    df.copies
        .iter()
        .find_map(|(src, dst)| {
            image_path
                .strip_prefix(dst.as_str())
                .map(|rest| (src, rest))
        })
        .map(|(src, rest)| repo().join(src).join(rest))
        .unwrap_or_else(|| panic!("no COPY puts {image_path} in the image"))
}

/// A tier's effective listen addresses and the other addresses it names, from its own loader.
#[derive(Debug, Default)]
pub struct Loaded {
    pub listen: Vec<String>,
    pub http: String,
    pub rpc: String,
    pub logic_addrs: Vec<String>,
    pub advertise_rpc: String,
    pub advertise_ws: String,
    pub redis_url: String,
    pub server_id: String,
    pub trusted_proxies: Vec<String>,
}

pub fn load(tier: &str, file: &std::path::Path, env: HashMap<String, String>) -> Loaded {
    use rim_runtime::settings::load_with_env;
    let fail = |e: rim_runtime::settings::SettingsError| -> ! {
        panic!("{tier} with {}: config error: {e}", file.display())
    };
    match tier {
        "comet" => {
            let c: rim_comet::Config =
                load_with_env(Some(file), tier, rim_comet::config::LIST_KEYS, env)
                    .unwrap_or_else(|e| fail(e));
            let l = &c.listen;
            Loaded {
                listen: [&l.http, &l.tcp, &l.wss, &l.tls, &l.rpc, &l.ops]
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .cloned()
                    .collect(),
                http: l.http.clone(),
                rpc: l.rpc.clone(),
                logic_addrs: c.logic.addrs.clone(),
                advertise_rpc: c.advertise.rpc_addr.clone(),
                advertise_ws: c.advertise.ws_addr.clone(),
                server_id: c.server_id.clone(),
                trusted_proxies: c.limits.trusted_proxies.clone(),
                ..Default::default()
            }
        }
        "logic" => {
            let c: rim_logic::Config =
                load_with_env(Some(file), tier, rim_logic::config::LIST_KEYS, env)
                    .unwrap_or_else(|e| fail(e));
            Loaded {
                listen: vec![c.listen.http.clone(), c.listen.rpc.clone()],
                http: c.listen.http.clone(),
                rpc: c.listen.rpc.clone(),
                redis_url: c.redis.url.clone(),
                ..Default::default()
            }
        }
        "job" => {
            let c: rim_job::Config =
                load_with_env(Some(file), tier, rim_runtime::redis::LIST_KEYS, env)
                    .unwrap_or_else(|e| fail(e));
            Loaded {
                listen: vec![c.listen.http.clone()],
                http: c.listen.http.clone(),
                redis_url: c.redis.url.clone(),
                ..Default::default()
            }
        }
        other => panic!("unknown tier {other}"),
    }
}

/// A YAML sequence of strings (empty when absent).
pub fn strings(v: &serde_norway::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}
