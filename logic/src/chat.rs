//! Real IM on top of push: upstream messages (SendMsg) under the `[chat]` send policy, and
//! presence events (op 24 RoomEvent) when a user's first session enters or last one leaves a
//! room of a listed type.
//!
//! A message is queued exactly like a push (accepted = durable in a stream); its body is
//! `ChatBody{from, data}` where `from` comes from the sender's authenticated session, so a client
//! cannot impersonate anyone by putting a "from" in its data.

use bytes::Bytes;
use rim_proto::job::{self, Route};
use rim_proto::msg::{ChatBody, RoomEventBody};
use rim_proto::room::RoomId;
use rim_proto::rpc::{LogicError as RpcError, PushAccepted, SendMsgRequest, SendTarget};

use crate::App;
use crate::publish::{Target, new_msg_id};
use crate::room_policy::Action;
use crate::store::Membership;

/// The JSON body recipients of a message from `from` receive.
pub(crate) fn chat_body(from: i64, data: serde_json::Value) -> Result<Bytes, RpcError> {
    serde_json::to_vec(&ChatBody { from, data })
        .map(Bytes::from)
        .map_err(|e| RpcError::Internal(format!("encoding message body: {e}")))
}

impl App {
    /// Accepts an upstream message: validates it, applies the send policy, queues it, then hands
    /// it to the webhook (never before it is queued, never waiting for it).
    pub(crate) async fn send_msg(&self, req: SendMsgRequest) -> Result<PushAccepted, RpcError> {
        let r = self.send_msg_inner(&req).await;
        match &r {
            Ok(acc) => {
                match req.target {
                    SendTarget::Room(_) => self.metrics.msgs_room.inc(),
                    SendTarget::Mid(_) => self.metrics.msgs_mid.inc(),
                }
                self.forward_to_webhook(&req, &acc.id);
            }
            Err(e) => {
                self.metrics.msg_refused(e);
                let to = match &req.target {
                    SendTarget::Room(room) => format!("room {room}"),
                    SendTarget::Mid(mid) => format!("mid {mid}"),
                };
                self.refusals.record(
                    "message",
                    e.to_string(),
                    format!("mid {} to {to}", req.sender.mid),
                );
                tracing::debug!(mid = req.sender.mid, key = %req.sender.key, error = %e, "message refused");
            }
        }
        r
    }

    async fn send_msg_inner(&self, req: &SendMsgRequest) -> Result<PushAccepted, RpcError> {
        let chat = &self.config.chat;
        if req.op < rim_proto::op::APP_MIN {
            return Err(RpcError::BadRequest(format!(
                "op: {} is below {} (application ops only)",
                req.op,
                rim_proto::op::APP_MIN
            )));
        }
        if req.data_json.len() > chat.max_data_bytes {
            return Err(RpcError::BadRequest(format!(
                "data exceeds chat.max_data_bytes of {} bytes",
                chat.max_data_bytes
            )));
        }
        let data: serde_json::Value = serde_json::from_str(&req.data_json)
            .map_err(|e| RpcError::BadRequest(format!("data: not valid JSON: {e}")))?;
        match &req.target {
            SendTarget::Room(room) => {
                if !chat.room_post {
                    return Err(RpcError::Forbidden("room messages are disabled".into()));
                }
                if req.sender_room.as_ref() != Some(room) {
                    return Err(RpcError::Forbidden(format!("not a member of {room}")));
                }
                self.check_room(
                    Action::Post,
                    req.sender.mid,
                    &req.sender.key,
                    room,
                    &req.grant,
                )
                .await?;
                let body = chat_body(req.sender.mid, data)?;
                let exclude = (!chat.echo_to_sender).then_some(req.sender.key.as_str());
                let id = new_msg_id();
                let stored = self
                    .append_jobs(
                        &id,
                        req.op,
                        &body,
                        vec![self.room_target(room.clone())],
                        exclude,
                    )
                    .await
                    .map_err(|e| RpcError::Unavailable(e.to_string()))?;
                Ok(PushAccepted {
                    id,
                    sessions: 0,
                    stored,
                })
            }
            SendTarget::Mid(mid) => {
                if !chat.direct {
                    return Err(RpcError::Forbidden("direct messages are disabled".into()));
                }
                let route = self
                    .mid_route(*mid)
                    .await
                    .map_err(|e| RpcError::Unavailable(e.to_string()))?;
                let sessions: u64 = route.iter().map(|s| s.keys.len() as u64).sum();
                // Kept for later when users keep history; refused only when nobody would get it.
                let routed = route
                    .iter()
                    .flat_map(|sk| sk.keys.iter().map(move |k| (k, &sk.server)));
                let record = self.user_record(*mid, routed);
                if sessions == 0 && record.is_none() {
                    return Err(RpcError::Offline(format!(
                        "no session online for mid {mid}"
                    )));
                }
                let body = chat_body(req.sender.mid, data)?;
                let target = Target {
                    partition: job::mid_partition(*mid, self.config.stream.partitions),
                    route: Route::Sessions(route),
                    history: record.into_iter().collect(),
                };
                let id = new_msg_id();
                let stored = self
                    .append_jobs(&id, req.op, &body, vec![target], None)
                    .await
                    .map_err(|e| RpcError::Unavailable(e.to_string()))?;
                Ok(PushAccepted {
                    id,
                    sessions,
                    stored,
                })
            }
        }
    }

    /// Whether rooms of this room's type get presence events.
    fn presence_on(&self, room: &str) -> bool {
        let types = &self.config.chat.presence_room_types;
        !types.is_empty()
            && RoomId::parse(room).is_ok_and(|r| types.iter().any(|t| t == r.room_type()))
    }

    /// Publishes the join/leave events a membership change caused: "leave" when the user's last
    /// session left a room (count now 0), "join" when its first entered (count now 1). Best
    /// effort: the membership change itself is already committed, so a failure is counted and
    /// logged rather than failing the caller.
    pub(crate) async fn presence(&self, mid: i64, change: Membership) {
        let left = change.left.into_iter().map(|c| ("leave", c, 0));
        let joined = change.joined.into_iter().map(|c| ("join", c, 1));
        for (event, (room, count), edge) in left.chain(joined) {
            if count != edge || !self.presence_on(&room) {
                continue;
            }
            let Ok(room_id) = RoomId::parse(&room) else {
                continue;
            };
            let body = RoomEventBody {
                event: event.into(),
                mid,
                room: room.clone(),
            };
            let Ok(body) = serde_json::to_vec(&body) else {
                continue;
            };
            let p = job::room_partition(&room_id, self.config.stream.partitions);
            // Presence is live state, not a message: never recorded in the room's history.
            let r = self
                .append_jobs(
                    &new_msg_id(),
                    rim_proto::op::ROOM_EVENT,
                    &Bytes::from(body),
                    vec![Target::unrecorded(p, Route::Room(room_id))],
                    None,
                )
                .await;
            match r {
                Ok(_) => self.metrics.presence_events.inc(),
                Err(e) => {
                    self.metrics.presence_failed.inc();
                    tracing::warn!(%room, mid, event, error = %e, "presence event not queued");
                }
            }
        }
    }
}
