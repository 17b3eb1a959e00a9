//! The bot webhook: upstream messages matching `[webhook]` (target room's type or target mid
//! listed) are POSTed as JSON `{"id","from","room"|"mid","op","data"}` to `webhook.url` after
//! they were queued. A 2xx JSON answer may carry `{"replies":[{"room"|"mid","op","data"}]}`,
//! each published as a push from `webhook.bot_mid`.
//!
//! Forwarding never delays or fails the message: `send_msg` only `try_send`s onto a bounded
//! queue (full → dropped, counted, logged) drained by `webhook.concurrency` workers. Timeouts,
//! connection errors and 5xx are retried with exponential backoff; the last failure is counted.
//! The client speaks plain http only (no TLS backend is built in): https endpoints need a local
//! TLS-terminating proxy.

use std::sync::Arc;
use std::time::Duration;

use rim_proto::msg::SendMsgBody;
use rim_proto::room::RoomId;
use rim_proto::rpc::{SendMsgRequest, SendTarget};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::App;
use crate::chat::chat_body;
use crate::hook_answer::ReadError;

/// First retry delay; doubled per attempt, capped at [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The sending side of the forward queue, held by the app.
pub(crate) struct Webhook {
    tx: mpsc::Sender<Value>,
}

/// Why the webhook client could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("webhook client: {0}")]
pub struct WebhookError(#[from] reqwest::Error);

/// What the workers consume: the queue's receiving end and the one HTTP client.
pub(crate) struct Workers {
    rx: Arc<Mutex<mpsc::Receiver<Value>>>,
    client: reqwest::Client,
}

/// Builds the queue and the HTTP client (once) for `[webhook]`; `None` when it is off.
pub(crate) fn setup(
    config: &crate::config::WebhookConfig,
) -> Result<Option<(Webhook, Workers)>, WebhookError> {
    if !config.enabled() {
        return Ok(None);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(config.timeout_ms))
        // The bot is at the configured URL: a redirect elsewhere (another host, a metadata
        // endpoint) is not followed but fails the attempt.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    Ok(Some((
        Webhook { tx },
        Workers {
            rx: Arc::new(Mutex::new(rx)),
            client,
        },
    )))
}

/// Starts `webhook.concurrency` workers on `tracker`; they stop at `shutdown` (queued forwards
/// are then abandoned, and in-flight POSTs cancelled, so shutdown never waits on a slow bot).
pub(crate) fn spawn(
    app: Arc<App>,
    workers: Workers,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) {
    for _ in 0..app.config.webhook.concurrency.max(1) {
        let (app, rx, client, shutdown) = (
            app.clone(),
            workers.rx.clone(),
            workers.client.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            loop {
                // The lock is held only while waiting for the next item, not while posting.
                let next = {
                    let mut rx = rx.lock().await;
                    tokio::select! {
                        _ = shutdown.cancelled() => None,
                        m = rx.recv() => m,
                    }
                };
                let Some(payload) = next else { return };
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = deliver(&app, &client, &payload) => {}
                }
            }
        });
    }
}

/// A bot's answer.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    /// Each parsed on its own so one bad reply does not discard the others.
    #[serde(default)]
    replies: Vec<Value>,
}

/// How one attempt ended.
enum Attempt {
    Done(bytes::Bytes),
    Retry(String),
    Fail(String),
}

/// [`read_capped`], as the outcome of a webhook attempt.
async fn read_bounded(resp: reqwest::Response) -> Result<bytes::Bytes, Attempt> {
    crate::hook_answer::read_capped(resp)
        .await
        .map_err(|e| match e {
            ReadError::Timeout(_) => Attempt::Retry(e.to_string()),
            _ => Attempt::Fail(e.to_string()),
        })
}

async fn attempt(client: &reqwest::Client, url: &str, payload: &Value) -> Attempt {
    match client.post(url).json(payload).send().await {
        Ok(resp) if resp.status().is_success() => match read_bounded(resp).await {
            Ok(b) => Attempt::Done(b),
            Err(failed) => failed,
        },
        Ok(resp) if resp.status().is_server_error() => {
            Attempt::Retry(format!("status {}", resp.status()))
        }
        Ok(resp) => Attempt::Fail(format!("status {}", resp.status())),
        Err(e) if e.is_timeout() || e.is_connect() || e.is_request() => {
            Attempt::Retry(e.to_string())
        }
        Err(e) => Attempt::Fail(e.to_string()),
    }
}

/// POSTs one forward with retries, then publishes the bot's replies.
async fn deliver(app: &App, client: &reqwest::Client, payload: &Value) {
    let cfg = &app.config.webhook;
    let mut backoff = BASE_BACKOFF;
    let mut tries = 0u32;
    let answer = loop {
        tries += 1;
        match attempt(client, &cfg.url, payload).await {
            Attempt::Done(b) => break b,
            Attempt::Retry(why) if tries <= cfg.retries => {
                tracing::debug!(tries, %why, "webhook attempt failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Attempt::Retry(why) | Attempt::Fail(why) => {
                app.metrics.webhook_failures.inc();
                tracing::warn!(tries, error = %why, id = %payload["id"], "webhook forward failed");
                return;
            }
        }
    };
    if answer.iter().all(u8::is_ascii_whitespace) {
        return; // no replies
    }
    let answer: Answer = match serde_json::from_slice(&answer) {
        Ok(a) => a,
        Err(e) => {
            app.metrics.webhook_bad_replies.inc();
            tracing::warn!(error = %e, "webhook answer is not {{\"replies\":[...]}} JSON");
            return;
        }
    };
    for reply in answer.replies {
        if let Err(why) = publish_reply(app, reply).await {
            app.metrics.webhook_bad_replies.inc();
            tracing::warn!(error = %why, "webhook reply not published");
        }
    }
}

/// Publishes one `{"room"|"mid","op","data"}` reply as a push from `bot_mid`.
async fn publish_reply(app: &App, reply: Value) -> Result<(), String> {
    let r: SendMsgBody = serde_json::from_value(reply).map_err(|e| format!("reply: {e}"))?;
    if r.op < rim_proto::op::APP_MIN {
        return Err(format!(
            "reply op {} is below {}",
            r.op,
            rim_proto::op::APP_MIN
        ));
    }
    let body = chat_body(app.config.webhook.bot_mid, r.data).map_err(|e| e.to_string())?;
    match (r.room, r.mid) {
        (Some(room), None) => {
            let room = RoomId::parse(&room).map_err(|e| format!("reply room: {e}"))?;
            app.push_room(r.op, room, body)
                .await
                .map_err(|e| e.to_string())?;
        }
        (None, Some(mid)) => {
            app.push_mids(r.op, &[mid], body)
                .await
                .map_err(|e| e.to_string())?;
        }
        _ => return Err("reply must name exactly one of room and mid".into()),
    }
    app.metrics.webhook_replies.inc();
    Ok(())
}

impl App {
    /// Hands a just-queued message to the webhook if it matches; never waits.
    pub(crate) fn forward_to_webhook(&self, req: &SendMsgRequest, id: &str) {
        let Some(hook) = &self.webhook else { return };
        let cfg = &self.config.webhook;
        let mut payload = json!({ "id": id, "from": req.sender.mid, "op": req.op });
        match &req.target {
            SendTarget::Room(room) if cfg.room_types.iter().any(|t| t == room.room_type()) => {
                payload["room"] = json!(room.as_str());
            }
            SendTarget::Mid(mid) if cfg.mids.contains(mid) => {
                payload["mid"] = json!(mid);
            }
            _ => return,
        }
        // Already validated by send_msg; re-parsed only for forwarded messages.
        payload["data"] = serde_json::from_str(&req.data_json).unwrap_or(Value::Null);
        match hook.tx.try_send(payload) {
            Ok(()) => self.metrics.webhook_queued.inc(),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.webhook_dropped.inc();
                rim_runtime::warn_throttled!(%id, queue = cfg.queue, "webhook queue full: message not forwarded");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.webhook_dropped.inc();
                tracing::warn!(%id, "webhook workers stopped: message not forwarded");
            }
        }
    }
}
