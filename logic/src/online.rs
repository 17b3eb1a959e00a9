//! Online counts and comet placement, read from the live comets' last renewals (cluster view).
//!
//! * top rooms of a type, counts of given rooms (keyed by the room id part, as goim does),
//!   totals of connections and IPs;
//! * `/goim/nodes/weighted`: the addresses a client should try, least loaded first. Each address
//!   is the comet's client-facing listener for the platform (see [`client_addr`]), with the host
//!   replaced by the comet's `domain` when set.

use serde::Serialize;
use serde_json::{Value, json};

use crate::App;
use crate::registry::LiveNode;
use crate::store::StoreError;

/// One room in `/goim/online/top`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopRoom {
    /// `type://id`.
    pub room_id: String,
    /// Members across live comets.
    pub count: u64,
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

/// The address a client on `platform` should dial on `node`: browsers (`web`) get the WebSocket
/// listener (wss preferred), others the TCP one, falling back to whichever exists. The host is
/// the comet's `domain` when configured, else the listen address as reported.
pub fn client_addr(node: &LiveNode, platform: &str) -> Option<String> {
    let i = &node.info;
    let order: [&str; 3] = if platform == "web" {
        [&i.wss_addr, &i.ws_addr, &i.tcp_addr]
    } else {
        [&i.tcp_addr, &i.ws_addr, &i.wss_addr]
    };
    let addr = order.into_iter().find(|a| !a.is_empty())?;
    if i.domain.is_empty() {
        Some(addr.to_string())
    } else {
        Some(format!("{}:{}", i.domain, port_of(addr)))
    }
}

impl App {
    /// Most populated rooms of `ty`.
    pub(crate) async fn online_top(
        &self,
        ty: &str,
        limit: usize,
    ) -> Result<Vec<TopRoom>, StoreError> {
        let view = self.cluster_view().await?;
        let prefix = format!("{ty}://");
        let mut rooms: Vec<TopRoom> = view
            .rooms()
            .into_iter()
            .filter(|(r, c)| r.starts_with(&prefix) && *c > 0)
            .map(|(room_id, count)| TopRoom { room_id, count })
            .collect();
        rooms.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then_with(|| a.room_id.cmp(&b.room_id))
        });
        rooms.truncate(limit);
        Ok(rooms)
    }

    /// Members of `type://id` for each id, keyed by id.
    pub(crate) async fn online_rooms(&self, ty: &str, ids: &[String]) -> Result<Value, StoreError> {
        let view = self.cluster_view().await?;
        let mut out = serde_json::Map::new();
        for id in ids {
            let n = view.room_count(&format!("{ty}://{id}"), None);
            out.insert(id.clone(), json!(n));
        }
        Ok(Value::Object(out))
    }

    /// Connections and IPs summed over live comets.
    pub(crate) async fn online_total(&self) -> Result<Value, StoreError> {
        let view = self.cluster_view().await?;
        let (ips, conns) = view.nodes.iter().fold((0u64, 0u64), |(i, c), n| {
            (i + n.info.ips, c + n.info.connections)
        });
        Ok(json!({ "ip_count": ips, "conn_count": conns }))
    }

    /// goim's `nodes/weighted` answer for `platform`.
    pub(crate) async fn nodes_weighted(&self, platform: &str) -> Result<Value, StoreError> {
        let view = self.cluster_view().await?;
        let mut nodes: Vec<&LiveNode> = view.nodes.iter().collect();
        // Least connections per unit of weight first (weight 0 counts as 1).
        nodes.sort_by(|a, b| {
            let la = a.info.connections as f64 / f64::from(a.info.weight.max(1));
            let lb = b.info.connections as f64 / f64::from(b.info.weight.max(1));
            la.total_cmp(&lb)
                .then_with(|| a.info.server.cmp(&b.info.server))
        });
        let addrs: Vec<String> = nodes
            .iter()
            .filter_map(|n| client_addr(n, platform))
            .collect();
        let first = nodes.first().map(|n| &n.info);
        let domain = first.map(|i| i.domain.clone()).unwrap_or_default();
        let port =
            |f: fn(&rim_proto::rpc::NodeInfo) -> &str| first.map(|i| port_of(f(i))).unwrap_or(0);
        Ok(json!({
            "domain": domain,
            "tcp_port": port(|i| &i.tcp_addr),
            "ws_port": port(|i| &i.ws_addr),
            "wss_port": port(|i| &i.wss_addr),
            "heartbeat": self.config.session.heartbeat_secs,
            "heartbeat_max": self.config.session.heartbeat_misses,
            "nodes": addrs,
            "backoff": self.config.node.backoff,
        }))
    }

    /// Every live comet with its weight, load and last renewal.
    pub(crate) async fn nodes_instances(&self) -> Result<Value, StoreError> {
        let view = self.cluster_view().await?;
        Ok(Value::Array(view.nodes.iter().map(node_json).collect()))
    }
}

/// A live comet as `/goim/nodes/instances` (and the operator page) show it.
pub(crate) fn node_json(n: &LiveNode) -> Value {
    let i = &n.info;
    json!({
        "server": i.server,
        "rpc_addr": i.rpc_addr,
        "domain": i.domain,
        "tcp_addr": i.tcp_addr,
        "ws_addr": i.ws_addr,
        "wss_addr": i.wss_addr,
        "tls_addr": i.tls_addr,
        "connections": i.connections,
        "ips": i.ips,
        "weight": i.weight,
        "started_ms": i.started_ms,
        "renewed_ms": i.renewed_ms,
        "expiry_ms": n.expiry_ms,
    })
}
