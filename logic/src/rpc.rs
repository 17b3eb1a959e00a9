//! `LogicRpc` served to comets (sessions, nodes) and backends (pushes). Each call is a thin
//! adapter onto [`App`]; pushes take the same publishing path as the HTTP API.

use std::sync::Arc;

use bytes::Bytes;
use rim_proto::history::{HistoryId, HistoryPage, HistoryWant};
use rim_proto::room::RoomId;
use rim_proto::rpc::{
    ConnectReply, ConnectRequest, LogicError as RpcError, LogicRpc, NodeInfo, OnlineCounts,
    OnlineReport, PushAccepted, SendMsgRequest, SessionRef, TokenGrant,
};
use tarpc::context::Context;

use crate::App;

/// The tarpc server: one clone per request, sharing the app.
#[derive(Clone)]
pub struct LogicServer(pub Arc<App>);

impl LogicRpc for LogicServer {
    async fn connect(self, _: Context, req: ConnectRequest) -> Result<ConnectReply, RpcError> {
        self.0.connect(req).await
    }

    async fn disconnect(
        self,
        _: Context,
        session: SessionRef,
        seen: Option<HistoryId>,
    ) -> Result<(), RpcError> {
        self.0.disconnect(session, seen).await
    }

    async fn history(
        self,
        _: Context,
        session: SessionRef,
        wants: Vec<HistoryWant>,
    ) -> Result<Vec<HistoryPage>, RpcError> {
        self.0.metrics.history_reads_catch_up.inc();
        self.0
            .catch_up(session.mid, &session.key, &wants)
            .await
            .map_err(|e| RpcError::Unavailable(e.to_string()))
    }

    async fn heartbeat(self, _: Context, session: SessionRef) -> Result<(), RpcError> {
        self.0.heartbeat(session).await
    }

    async fn room_joined(self, _: Context, server: String, room: RoomId) -> Result<(), RpcError> {
        self.0.room_joined(server, room).await
    }

    async fn join_room(
        self,
        _: Context,
        session: SessionRef,
        room: RoomId,
    ) -> Result<(), RpcError> {
        self.0.join_room(session, room).await
    }

    async fn leave_room(
        self,
        _: Context,
        session: SessionRef,
        room: RoomId,
    ) -> Result<(), RpcError> {
        self.0.leave_room(session, room).await
    }

    async fn renew_node(
        self,
        _: Context,
        node: NodeInfo,
        online: OnlineReport,
    ) -> Result<OnlineCounts, RpcError> {
        self.0.renew_node(node, online).await
    }

    async fn unregister_node(self, _: Context, server: String) -> Result<(), RpcError> {
        self.0.unregister_node(server).await
    }

    async fn push_keys(
        self,
        _: Context,
        op: i32,
        keys: Vec<String>,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.0.push_keys(op, &keys, body).await
    }

    async fn push_mids(
        self,
        _: Context,
        op: i32,
        mids: Vec<i64>,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.0.push_mids(op, &mids, body).await
    }

    async fn push_room(
        self,
        _: Context,
        op: i32,
        room: RoomId,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.0.push_room(op, room, body).await
    }

    async fn push_all(
        self,
        _: Context,
        op: i32,
        speed: u32,
        body: Bytes,
    ) -> Result<PushAccepted, RpcError> {
        self.0.push_all(op, speed, body).await
    }

    async fn send_msg(self, _: Context, req: SendMsgRequest) -> Result<PushAccepted, RpcError> {
        self.0.send_msg(req).await
    }

    async fn room_changed(
        self,
        _: Context,
        session: SessionRef,
        from: Option<RoomId>,
        to: Option<RoomId>,
    ) -> Result<(), RpcError> {
        self.0.room_changed(session, from, to).await
    }

    async fn check_join(
        self,
        _: Context,
        session: SessionRef,
        room: RoomId,
        grant: TokenGrant,
    ) -> Result<(), RpcError> {
        self.0.check_join(&session, &room, &grant).await
    }

    async fn refresh_token(
        self,
        _: Context,
        session: SessionRef,
        token: String,
    ) -> Result<TokenGrant, RpcError> {
        self.0.refresh_token(&session, &token)
    }
}
