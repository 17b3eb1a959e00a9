//! `deploy/k8s/rim.yaml` checked against the code it runs, like the compose file: every
//! workload runs a built binary of its tier with a config file its image holds (per the
//! Dockerfile's `COPY`), as the Dockerfile's unprivileged user; its environment (secrets and
//! the pod name filled in as Kubernetes would) is accepted by the tier's own loader; container
//! ports are ports the tier listens on, probes ask `/readyz` and `/healthz` on its HTTP
//! listener; Services select a workload and target its ports; comets have distinct, stable
//! server ids and advertise an RPC address that resolves through the headless Service; comets
//! reach logic through its Service's RPC port.
//!
//! There is no Kubernetes in the test: the manifests are read, the configs loaded by the tiers.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use rim_testkit::process::{binary, repo};
use serde::Deserialize;
use serde_norway::Value;

mod deploy_common;
use deploy_common::{dockerfile, host_of, load, port_of, source_in_repo, strings};

/// What the test gives for `secretKeyRef`s (as `kubectl create secret` would hold them).
const SECRET_VALUE: &str = "k8s-test-secret-0123456789abcdef";

fn manifests() -> Vec<Value> {
    let text = std::fs::read_to_string(repo().join("deploy/k8s/rim.yaml")).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut v = Value::deserialize(doc).unwrap();
            v.apply_merge().unwrap();
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap()
}

/// A container's environment as the kubelet makes it: literal values, secrets, the pod name
/// (`fieldRef: metadata.name`), and `$(VAR)` references to variables defined before.
fn environment(container: &Value, pod: &str) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = HashMap::new();
    for e in container["env"].as_sequence().unwrap() {
        let key = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            let mut v = v.to_string();
            for (k, val) in &env {
                v = v.replace(&format!("$({k})"), val);
            }
            assert!(!v.contains("$("), "{key}: {v} names an undefined variable");
            v
        } else if e["valueFrom"]["secretKeyRef"].is_mapping() {
            SECRET_VALUE.to_string()
        } else if e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("metadata.name") {
            pod.to_string()
        } else {
            panic!("{key}: unsupported env source {e:?}")
        };
        env.insert(key, value);
    }
    env
}

/// A container port by name or number.
fn container_port(container: &Value, port: &Value) -> u16 {
    let ports = container["ports"].as_sequence().unwrap();
    if let Some(n) = port.as_u64() {
        assert!(
            ports.iter().any(|p| p["containerPort"].as_u64() == Some(n)),
            "no container port {n}"
        );
        return n as u16;
    }
    let want = port.as_str().unwrap();
    container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some(want))
        .unwrap_or_else(|| panic!("no container port named {want}"))["containerPort"]
        .as_u64()
        .unwrap() as u16
}

#[test]
fn the_kubernetes_example_matches_the_binaries_and_configs() {
    let docs = manifests();
    let df = dockerfile(&repo().join("deploy/container/Dockerfile"));
    let services: Vec<&Value> = docs.iter().filter(|d| kind(d) == "Service").collect();
    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| ["Deployment", "StatefulSet"].contains(&kind(d)))
        .collect();
    assert_eq!(workloads.len(), 3, "logic, job and comet");

    // Per tier: its loaded config (for pod 0) and its workload.
    let mut tiers = HashMap::new();
    for w in &workloads {
        let spec = &w["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], Value::Bool(true));
        let containers = spec["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "{}", name(w));
        let c = &containers[0];
        let command = strings(&c["command"]);
        let tier = command[0].strip_prefix("rim-").unwrap().to_string();
        assert!(binary(&command[0]).is_file(), "{} is not built", command[0]);
        assert!(
            c["image"].as_str().unwrap().contains(&command[0]),
            "{}: image {:?} is not the {tier} image",
            name(w),
            c["image"]
        );
        assert!(
            df.stages.contains_key(&tier),
            "no {tier} stage in the Dockerfile"
        );
        assert_eq!(command[1], "--config");
        let config = source_in_repo(&df, &command[2]);
        assert!(
            config.is_file(),
            "{}: {} not in the image",
            name(w),
            command[2]
        );

        let pods: Vec<String> = if kind(w) == "StatefulSet" {
            let n = w["spec"]["replicas"].as_u64().unwrap();
            (0..n).map(|i| format!("{}-{i}", name(w))).collect()
        } else {
            vec![format!("{}-5d8f9c7b6-x2x4k", name(w))]
        };
        let mut loaded = Vec::new();
        for pod in &pods {
            let env = environment(c, pod);
            let prefix = format!("RIM_{}__", tier.to_uppercase());
            for k in env.keys() {
                assert!(
                    k.starts_with(&prefix) || k == "POD_NAME",
                    "{}: {k} is not a {tier} setting",
                    name(w)
                );
            }
            let rim: HashMap<String, String> = env
                .into_iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .collect();
            loaded.push(load(&tier, &config, rim));
        }
        let l = &loaded[0];
        for p in c["ports"].as_sequence().unwrap() {
            let port = p["containerPort"].as_u64().unwrap() as u16;
            assert!(
                l.listen.iter().any(|a| port_of(a) == port),
                "{}: container port {port}, listens on {:?}",
                name(w),
                l.listen
            );
        }
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"].as_str(), Some(path), "{} {probe}", name(w));
            assert_eq!(
                container_port(c, &get["port"]),
                port_of(&l.http),
                "{} {probe} port",
                name(w)
            );
        }
        if tier == "comet" {
            // Stable, distinct server ids; an RPC address job can resolve.
            let ids: std::collections::HashSet<&String> =
                loaded.iter().map(|l| &l.server_id).collect();
            assert_eq!(ids.len(), pods.len(), "server ids repeat");
            for (l, pod) in loaded.iter().zip(&pods) {
                assert_eq!(&l.server_id, pod);
                let service = w["spec"]["serviceName"].as_str().unwrap();
                assert_eq!(
                    l.advertise_rpc,
                    format!("{pod}.{service}:{}", port_of(&l.rpc))
                );
                let headless = services.iter().find(|s| name(s) == service).unwrap();
                assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
                // job must resolve a comet whose readiness dipped.
                assert_eq!(
                    headless["spec"]["publishNotReadyAddresses"].as_bool(),
                    Some(true)
                );
            }
        }
        tiers.insert(tier, (w, c, loaded.remove(0)));
    }

    // Services select a workload and target its ports.
    for s in &services {
        let selector = &s["spec"]["selector"];
        let (_, (w, c, _)) = tiers
            .iter()
            .find(|(_, (w, _, _))| &w["spec"]["template"]["metadata"]["labels"] == selector)
            .unwrap_or_else(|| panic!("service {} selects no workload", name(s)));
        for p in s["spec"]["ports"].as_sequence().unwrap() {
            container_port(c, &p["targetPort"]);
        }
        assert!(!name(w).is_empty());
    }

    // Comets dial logic through its Service's RPC port.
    let (_, _, comet) = &tiers["comet"];
    let (_, logic_c, logic) = &tiers["logic"];
    for a in &comet.logic_addrs {
        let svc = services
            .iter()
            .find(|s| name(s) == host_of(a))
            .unwrap_or_else(|| panic!("logic.addrs {a}: no such service"));
        let port = svc["spec"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["port"].as_u64() == Some(u64::from(port_of(a))))
            .unwrap_or_else(|| panic!("service {} has no port {}", name(svc), port_of(a)));
        assert_eq!(
            container_port(logic_c, &port["targetPort"]),
            port_of(&logic.rpc)
        );
    }
}
