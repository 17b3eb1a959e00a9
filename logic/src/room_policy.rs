//! Room permissions: who may join and who may post, per room type (`[rooms.<type>]`), checked
//! by logic at connect (the Auth body's room), before a ChangeRoom into a guarded type (comet
//! asks [`App::check_join`]) and for every room post (SendMsg).
//!
//! A policy is `open` (any authenticated session), `token` (the session's token must name the
//! room or its type in a JWT `rooms` claim) or `backend` (logic asks `[room_hook] url` and obeys;
//! a hook that fails or times out refuses: fail closed). A token's `rooms` claim bounds every
//! room, whatever the type's policy. Types not listed are `open` for both.

use std::collections::HashMap;
use std::time::Duration;

use rim_proto::room::RoomId;
use rim_proto::rpc::{LogicError as RpcError, TokenGrant};
use rim_runtime::settings::SettingsError;
use serde::{Deserialize, Serialize};

use crate::App;
use crate::auth::TokenError;

/// Who may do something in rooms of a type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Any authenticated session.
    #[default]
    Open,
    /// A session whose token's `rooms` claim names the room (or its type).
    Token,
    /// Whoever `[room_hook] url` allows.
    Backend,
}

/// `[rooms.<type>]`: the policy of one room type.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomTypePolicy {
    /// Who may join (Auth `room_id`, ChangeRoom).
    pub join: Access,
    /// Who may post (SendMsg to the room the session is in).
    pub post: Access,
}

/// `[room_hook]`: the backend asked about rooms whose policy is `backend`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomHookConfig {
    /// `http://` URL POSTed `{"action":"join"|"post","mid","key","room"}`; answered 2xx with
    /// `{"allow":true}` to allow, `{"allow":false,"reason":"..."}` to refuse.
    pub url: String,
    /// Bound on one check (ms); past it the action is refused.
    pub timeout_ms: u64,
    /// Sent as `Authorization: Bearer <secret>` when set, so the hook knows it is logic.
    pub secret: String,
}

impl Default for RoomHookConfig {
    fn default() -> Self {
        RoomHookConfig {
            url: String::new(),
            timeout_ms: 1_000,
            secret: String::new(),
        }
    }
}

impl std::fmt::Debug for RoomHookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomHookConfig")
            .field("url", &self.url)
            .field("timeout_ms", &self.timeout_ms)
            .field("secret", &if self.secret.is_empty() { "" } else { "<set>" })
            .finish()
    }
}

/// Checks `[rooms]` against `[room_hook]`: a `backend` policy needs a hook URL.
pub fn validate(
    rooms: &HashMap<String, RoomTypePolicy>,
    hook: &RoomHookConfig,
) -> Result<(), SettingsError> {
    for (ty, p) in rooms {
        if ty.is_empty() || ty.contains("://") {
            return Err(SettingsError::invalid(
                format!("rooms.{ty}"),
                "must be a room type (the part before ://)",
            ));
        }
        if (p.join == Access::Backend || p.post == Access::Backend) && hook.url.is_empty() {
            return Err(SettingsError::invalid(
                "room_hook.url",
                format!("must be set: rooms.{ty} uses the \"backend\" policy"),
            ));
        }
    }
    if !hook.url.is_empty() && !hook.url.starts_with("http://") {
        return Err(SettingsError::invalid(
            "room_hook.url",
            "must be an http:// URL (put a local TLS proxy in front of an https endpoint)",
        ));
    }
    if !hook.url.is_empty() && hook.timeout_ms == 0 {
        return Err(SettingsError::invalid(
            "room_hook.timeout_ms",
            "must be > 0",
        ));
    }
    Ok(())
}

/// Room types whose joins logic must approve (not `open`), sorted: told to comets in every
/// `ConnectReply` so they ask [`App::check_join`] before a ChangeRoom into one. Derived from
/// `[rooms]` once, at start.
pub(crate) fn guarded_room_types(rooms: &HashMap<String, RoomTypePolicy>) -> Vec<String> {
    let mut v: Vec<String> = rooms
        .iter()
        .filter(|(_, p)| p.join != Access::Open)
        .map(|(t, _)| t.clone())
        .collect();
    v.sort_unstable();
    v
}

/// What a session asks to do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Be a member.
    Join,
    /// Post a message.
    Post,
}

/// One check for the hook.
#[derive(Debug, Serialize)]
struct HookRequest<'a> {
    action: Action,
    mid: i64,
    key: &'a str,
    room: &'a str,
}

/// The hook's answer.
#[derive(Debug, Deserialize)]
struct HookAnswer {
    allow: bool,
    #[serde(default)]
    reason: String,
}

/// The HTTP client of `[room_hook]`, built once.
pub(crate) struct RoomHook {
    client: reqwest::Client,
    url: String,
    secret: String,
}

/// Why the hook client could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("room hook client: {0}")]
pub struct RoomHookError(#[from] reqwest::Error);

impl RoomHook {
    /// The client for `config`; `None` when no URL is set.
    pub(crate) fn setup(config: &RoomHookConfig) -> Result<Option<RoomHook>, RoomHookError> {
        if config.url.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Some(RoomHook {
            client,
            url: config.url.clone(),
            secret: config.secret.clone(),
        }))
    }

    /// The hook's verdict; any failure to get one refuses (fail closed).
    async fn ask(&self, req: &HookRequest<'_>) -> Result<(), RpcError> {
        let mut call = self.client.post(&self.url).json(req);
        if !self.secret.is_empty() {
            call = call.bearer_auth(&self.secret);
        }
        let unavailable = |e: &dyn std::fmt::Display| {
            // A hook that is down fails every check: one line a second (counted in the metrics).
            rim_runtime::warn_throttled!(url = %self.url, error = %e, "room hook failed: refusing");
            RpcError::Unavailable("room check unavailable".into())
        };
        let resp = call.send().await.map_err(|e| unavailable(&e))?;
        if !resp.status().is_success() {
            return Err(unavailable(&format!("status {}", resp.status())));
        }
        // Bounded like the webhook's answers: a hook is trusted to answer, not to flood.
        let bytes = crate::hook_answer::read_capped(resp)
            .await
            .map_err(|e| unavailable(&e))?;
        let answer: HookAnswer = serde_json::from_slice(&bytes).map_err(|e| unavailable(&e))?;
        if answer.allow {
            Ok(())
        } else if answer.reason.is_empty() {
            Err(RpcError::Forbidden("room refused".into()))
        } else {
            Err(RpcError::Forbidden(answer.reason))
        }
    }
}

impl App {
    /// The policy of `room`'s type (`open` for both when the type is not listed).
    fn room_policy(&self, room: &RoomId) -> RoomTypePolicy {
        self.config
            .rooms
            .get(room.room_type())
            .copied()
            .unwrap_or_default()
    }

    /// Whether the session (`mid`, `key`, holding `grant`) may do `action` in `room`; the
    /// error names why not. Counted per action and outcome.
    pub(crate) async fn check_room(
        &self,
        action: Action,
        mid: i64,
        key: &str,
        room: &RoomId,
        grant: &TokenGrant,
    ) -> Result<(), RpcError> {
        let r = self.check_room_inner(action, mid, key, room, grant).await;
        self.metrics.room_check(action, &r);
        r
    }

    async fn check_room_inner(
        &self,
        action: Action,
        mid: i64,
        key: &str,
        room: &RoomId,
        grant: &TokenGrant,
    ) -> Result<(), RpcError> {
        // The token's own bound holds whatever the type's policy.
        if !grant.allows_room(room.as_str()) {
            return Err(RpcError::Forbidden(TokenError::Room.to_string()));
        }
        let policy = self.room_policy(room);
        let access = match action {
            Action::Join => policy.join,
            Action::Post => policy.post,
        };
        match access {
            Access::Open => Ok(()),
            Access::Token if grant.names_room(room.as_str()) => Ok(()),
            Access::Token => Err(RpcError::Forbidden(format!(
                "room requires a token that names it ({action:?} in {})",
                room.room_type()
            ))),
            Access::Backend => match &self.room_hook {
                Some(hook) => {
                    hook.ask(&HookRequest {
                        action,
                        mid,
                        key,
                        room: room.as_str(),
                    })
                    .await
                }
                // validate() requires the URL; refuse rather than allow if it is missing.
                None => Err(RpcError::Unavailable("room check unavailable".into())),
            },
        }
    }

    /// [`App::check_room`] for a join asked by a comet before a ChangeRoom.
    pub(crate) async fn check_join(
        &self,
        s: &rim_proto::rpc::SessionRef,
        room: &RoomId,
        grant: &TokenGrant,
    ) -> Result<(), RpcError> {
        self.check_room(Action::Join, s.mid, &s.key, room, grant)
            .await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn app_with(rooms: &[(&str, Access, Access)]) -> std::sync::Arc<App> {
        let mut c = Config::dev();
        for (t, join, post) in rooms {
            c.rooms.insert(
                t.to_string(),
                RoomTypePolicy {
                    join: *join,
                    post: *post,
                },
            );
        }
        App::in_memory(c).0
    }

    fn room(r: &str) -> RoomId {
        RoomId::parse(r).unwrap()
    }

    fn grant(rooms: Option<&[&str]>) -> TokenGrant {
        TokenGrant {
            rooms: rooms.map(|r| r.iter().map(|s| s.to_string()).collect()),
            expires_ms: 0,
        }
    }

    #[tokio::test]
    async fn open_token_and_the_claim_bound() {
        let app = app_with(&[("vip", Access::Token, Access::Token)]);
        let any = grant(None);
        // Unlisted type: open, unless the token's claim excludes it.
        assert!(
            app.check_room(Action::Join, 1, "k", &room("live://1"), &any)
                .await
                .is_ok()
        );
        let only_chat = grant(Some(&["chat://*"]));
        let e = app
            .check_room(Action::Join, 1, "k", &room("live://1"), &only_chat)
            .await
            .unwrap_err();
        assert_eq!(e, RpcError::Forbidden("room not allowed by token".into()));
        // Token policy: no claim is not enough; a claim naming the room or its type is.
        let e = app
            .check_room(Action::Post, 1, "k", &room("vip://1"), &any)
            .await
            .unwrap_err();
        assert!(matches!(e, RpcError::Forbidden(m) if m.contains("token that names it")));
        for ok in [&["vip://1"][..], &["vip://*"][..]] {
            assert!(
                app.check_room(Action::Join, 1, "k", &room("vip://1"), &grant(Some(ok)))
                    .await
                    .is_ok()
            );
        }
        assert!(
            app.check_room(
                Action::Join,
                1,
                "k",
                &room("vip://2"),
                &grant(Some(&["vip://1"]))
            )
            .await
            .is_err()
        );
        assert_eq!(app.guarded_room_types, vec!["vip".to_string()]);
    }

    #[test]
    fn backend_needs_a_hook_url() {
        let mut rooms = HashMap::new();
        rooms.insert(
            "ask".to_string(),
            RoomTypePolicy {
                join: Access::Backend,
                post: Access::Open,
            },
        );
        let e = validate(&rooms, &RoomHookConfig::default()).unwrap_err();
        assert!(e.to_string().contains("room_hook.url"), "{e}");
        let hook = RoomHookConfig {
            url: "http://127.0.0.1:9/check".into(),
            ..RoomHookConfig::default()
        };
        validate(&rooms, &hook).unwrap();
        rooms.insert("bad://".into(), RoomTypePolicy::default());
        assert!(validate(&rooms, &hook).is_err());
    }
}
