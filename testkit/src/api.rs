//! logic's HTTP API as a backend calls it, and waits on Redis state that tests need.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// A client of logic's HTTP API.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
    secret: Option<String>,
}

/// A response: HTTP status and the parsed envelope.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// `{"code","message","data"}`.
    pub body: Value,
}

impl ApiResponse {
    /// `code` of the envelope.
    pub fn code(&self) -> i64 {
        self.body
            .get("code")
            .and_then(Value::as_i64)
            .unwrap_or(i64::MIN)
    }
    /// `message` of the envelope.
    pub fn message(&self) -> &str {
        self.body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    /// `data` of the envelope.
    pub fn data(&self) -> &Value {
        self.body.get("data").unwrap_or(&Value::Null)
    }
    /// Fails unless code is 0.
    pub fn ok(self) -> anyhow::Result<ApiResponse> {
        if self.status != 200 || self.code() != 0 {
            bail!("API call failed: {} {}", self.status, self.body);
        }
        Ok(self)
    }
}

impl Api {
    /// API at `http://addr`.
    pub fn new(addr: std::net::SocketAddr) -> Api {
        Api {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            secret: None,
        }
    }

    /// Sends `Authorization: Bearer <secret>` on every call.
    pub fn with_secret(mut self, secret: &str) -> Api {
        self.secret = Some(secret.to_string());
        self
    }

    /// POST `path?query` with a raw body.
    pub async fn post(
        &self,
        path_and_query: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<ApiResponse> {
        let mut req = self
            .http
            .post(format!("{}{}", self.base, path_and_query))
            .body(body);
        if let Some(s) = &self.secret {
            req = req.bearer_auth(s);
        }
        Self::finish(req.send().await.context("POST")?).await
    }

    /// GET `path?query`.
    pub async fn get(&self, path_and_query: &str) -> anyhow::Result<ApiResponse> {
        let mut req = self.http.get(format!("{}{}", self.base, path_and_query));
        if let Some(s) = &self.secret {
            req = req.bearer_auth(s);
        }
        Self::finish(req.send().await.context("GET")?).await
    }

    async fn finish(resp: reqwest::Response) -> anyhow::Result<ApiResponse> {
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let body = serde_json::from_str(&text)
            .map_err(|_| anyhow!("non-JSON response {status}: {text}"))?;
        Ok(ApiResponse { status, body })
    }

    /// Push to users; returns the envelope's data.
    pub async fn push_mids(&self, op: i32, mids: &[i64], body: &[u8]) -> anyhow::Result<Value> {
        let q: Vec<String> = mids.iter().map(|m| format!("mids={m}")).collect();
        Ok(self
            .post(
                &format!("/goim/push/mids?operation={op}&{}", q.join("&")),
                body.to_vec(),
            )
            .await?
            .ok()?
            .data()
            .clone())
    }

    /// Push to sessions.
    pub async fn push_keys(&self, op: i32, keys: &[&str], body: &[u8]) -> anyhow::Result<Value> {
        let q: Vec<String> = keys
            .iter()
            .map(|k| {
                format!(
                    "keys={}",
                    form_urlencoded::byte_serialize(k.as_bytes()).collect::<String>()
                )
            })
            .collect();
        Ok(self
            .post(
                &format!("/goim/push/keys?operation={op}&{}", q.join("&")),
                body.to_vec(),
            )
            .await?
            .ok()?
            .data()
            .clone())
    }

    /// Push to room `ty://room`.
    pub async fn push_room(
        &self,
        op: i32,
        ty: &str,
        room: &str,
        body: &[u8],
    ) -> anyhow::Result<Value> {
        let room = form_urlencoded::byte_serialize(room.as_bytes()).collect::<String>();
        Ok(self
            .post(
                &format!("/goim/push/room?operation={op}&type={ty}&room={room}"),
                body.to_vec(),
            )
            .await?
            .ok()?
            .data()
            .clone())
    }

    /// Push to everyone.
    pub async fn push_all(&self, op: i32, body: &[u8]) -> anyhow::Result<Value> {
        Ok(self
            .post(&format!("/goim/push/all?operation={op}"), body.to_vec())
            .await?
            .ok()?
            .data()
            .clone())
    }

    /// Waits (up to `wait`) until logic lists exactly `n` live comets.
    pub async fn wait_live_nodes(&self, n: usize, wait: Duration) -> anyhow::Result<()> {
        eventually("comets registered", wait, || {
            let api = self.clone();
            async move {
                let r = api.get("/goim/nodes/instances").await.ok()?;
                (r.data().as_array().map(Vec::len) == Some(n)).then_some(())
            }
        })
        .await
    }
}

/// One sample of the `/metrics` served at `http` (`name` may carry labels, e.g.
/// `x{side="accept"}`); `None` when the scrape failed or the series is absent.
pub async fn metric(http: std::net::SocketAddr, name: &str) -> Option<u64> {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Polls `check` until it returns `Some`, failing after `wait`. For state that has no event to
/// subscribe to (Redis keys, a process's HTTP readiness).
pub async fn eventually<T, F, Fut>(what: &str, wait: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {wait:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether every push stream's consumer group has read and acknowledged everything appended:
/// every accepted push has been confirmed by the comets it was routed to.
pub fn streams_drained(conn: &mut dyn redis::ConnectionLike) -> anyhow::Result<bool> {
    let streams: Vec<String> = redis::cmd("KEYS").arg("rim:push:{*}").query(conn)?;
    for stream in streams {
        let info: std::collections::HashMap<String, redis::Value> =
            redis::cmd("XINFO").arg("STREAM").arg(&stream).query(conn)?;
        let last: String = info
            .get("last-generated-id")
            .map(|v| redis::from_redis_value(v.clone()))
            .transpose()?
            .unwrap_or_default();
        let groups: Vec<redis::Value> =
            redis::cmd("XINFO").arg("GROUPS").arg(&stream).query(conn)?;
        if groups.is_empty() {
            return Ok(false);
        }
        for g in groups {
            let map: std::collections::HashMap<String, redis::Value> = redis::from_redis_value(g)?;
            let pending = map
                .get("pending")
                .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok());
            let delivered = map
                .get("last-delivered-id")
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok());
            if pending != Some(0) || delivered.as_deref() != Some(last.as_str()) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
