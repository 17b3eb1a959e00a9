//! This comet as the cluster sees it: the `NodeInfo` it publishes with every renewal (addresses a
//! peer can dial) and its readiness on `/readyz` (registered, logic reachable) next to `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::future::BoxFuture;
use rim_proto::rpc::NodeInfo;
use rim_runtime::ops::OpsSource;

use crate::config::Config;
use crate::ctx::Ctx;

/// Where this comet's listeners are bound.
pub(crate) struct Bound {
    pub http: SocketAddr,
    pub tcp: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub rpc: SocketAddr,
}

/// What this comet publishes about itself, before any renewal counted its load.
pub(crate) fn node_info(config: &Config, bound: &Bound) -> NodeInfo {
    NodeInfo {
        server: config.server_id.clone(),
        rpc_addr: advertised(
            "advertise.rpc_addr",
            &config.advertise.rpc_addr,
            &config.advertise.domain,
            Some(bound.rpc),
        ),
        domain: config.advertise.domain.clone(),
        tcp_addr: advertised(
            "advertise.tcp_addr",
            &config.advertise.tcp_addr,
            &config.advertise.domain,
            bound.tcp,
        ),
        ws_addr: advertised(
            "advertise.ws_addr",
            &config.advertise.ws_addr,
            &config.advertise.domain,
            Some(bound.http),
        ),
        wss_addr: advertised(
            "advertise.wss_addr",
            &config.advertise.wss_addr,
            &config.advertise.domain,
            bound.wss,
        ),
        tls_addr: advertised(
            "advertise.tls_addr",
            &config.advertise.tls_addr,
            &config.advertise.domain,
            bound.tls,
        ),
        connections: 0,
        ips: 0,
        weight: config.advertise.weight,
        started_ms: rim_runtime::unix_ms(),
        renewed_ms: 0,
    }
}

/// `/readyz` and `/metrics` of the comet.
pub(crate) struct Ops(pub(crate) Arc<Ctx>);

impl OpsSource for Ops {
    fn ready(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.0.registered.load(Ordering::Acquire) {
                return Err("not registered with logic yet".into());
            }
            if !self.0.logic_ok.load(Ordering::Acquire) {
                return Err("logic unreachable".into());
            }
            Ok(())
        })
    }

    fn metrics(&self) -> String {
        self.0.metrics.render() + &self.0.metrics.rpc.render() + &self.0.metrics.tls.render()
    }
}

/// The address published for a listener: the configured one, else the bound one. A wildcard
/// bind (0.0.0.0 / ::) is no address a peer can dial, so it is published as `domain:port`, or as
/// loopback (with a warning) when no domain is configured.
fn advertised(field: &str, configured: &str, domain: &str, bound: Option<SocketAddr>) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    let Some(bound) = bound else {
        return String::new();
    };
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    if !domain.is_empty() {
        return format!("{domain}:{}", bound.port());
    }
    let loopback = SocketAddr::new(
        if bound.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        },
        bound.port(),
    );
    tracing::warn!(%bound, advertised = %loopback, "listener bound to a wildcard address; set {field} or advertise.domain so other hosts can reach it");
    loopback.to_string()
}

#[cfg(test)]
mod tests {
    use super::advertised;

    #[test]
    fn wildcard_binds_are_published_as_a_dialable_address() {
        let any = Some("0.0.0.0:3101".parse().unwrap());
        assert_eq!(advertised("f", "", "", any), "127.0.0.1:3101");
        assert_eq!(
            advertised("f", "", "push.example.com", any),
            "push.example.com:3101"
        );
        assert_eq!(
            advertised("f", "10.0.0.1:9", "push.example.com", any),
            "10.0.0.1:9"
        );
        assert_eq!(
            advertised("f", "", "", Some("127.0.0.2:5".parse().unwrap())),
            "127.0.0.2:5"
        );
        assert_eq!(advertised("f", "", "", None), "");
    }
}
