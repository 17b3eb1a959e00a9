//! The in-memory comets, directory and health (see the parent module).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use rim_proto::room::RoomId;
use rim_proto::rpc::NodeInfo;

use super::{Memory, millis};
use crate::store::{Directory, Health, LiveNode, NodeStore, StoreError, StoreResult};

#[async_trait]
impl NodeStore for Memory {
    async fn stored(&self, server: &str) -> StoreResult<Option<NodeInfo>> {
        Ok(self.0.lock().nodes.get(server).cloned())
    }

    async fn room_joined(&self, server: &str, room: &RoomId, rooms_ttl_ms: u64) -> StoreResult<()> {
        let mut st = self.0.lock();
        st.room_nodes
            .entry(room.as_str().to_string())
            .or_default()
            .insert(server.to_string());
        let rooms = st.node_rooms(server).cloned().unwrap_or_default();
        let mut rooms = rooms;
        rooms.entry(room.as_str().to_string()).or_insert(0);
        st.node_rooms
            .insert(server.to_string(), (rooms, millis(rooms_ttl_ms)));
        Ok(())
    }

    async fn renew(
        &self,
        node: &NodeInfo,
        expiry_ms: u64,
        reported: &BTreeMap<String, u64>,
        rooms_ttl_ms: u64,
    ) -> StoreResult<()> {
        let mut st = self.0.lock();
        let server = node.server.clone();
        let old: Vec<String> = st
            .node_rooms(&server)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        st.nodes.insert(server.clone(), node.clone());
        st.expiry.insert(server.clone(), expiry_ms);
        st.node_rooms.remove(&server);
        if !reported.is_empty() {
            st.node_rooms
                .insert(server.clone(), (reported.clone(), millis(rooms_ttl_ms)));
        }
        for room in old.iter().filter(|r| !reported.contains_key(*r)) {
            if let Some(set) = st.room_nodes.get_mut(room) {
                set.remove(&server);
            }
        }
        for room in reported.keys() {
            st.room_nodes
                .entry(room.clone())
                .or_default()
                .insert(server.clone());
        }
        Ok(())
    }

    async fn remove(&self, server: &str) -> StoreResult<()> {
        let mut st = self.0.lock();
        st.expiry.remove(server);
        st.nodes.remove(server);
        Ok(())
    }

    async fn drop_rooms(&self, server: &str) -> StoreResult<()> {
        let mut st = self.0.lock();
        let rooms: Vec<String> = st
            .node_rooms(server)
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        for room in rooms {
            if let Some(set) = st.room_nodes.get_mut(&room) {
                set.remove(server);
            }
        }
        st.node_rooms.remove(server);
        Ok(())
    }

    async fn expired(&self, now_ms: u64) -> StoreResult<Vec<String>> {
        let st = self.0.lock();
        if st.down {
            return Err(StoreError::Timeout(Duration::ZERO));
        }
        Ok(st
            .expiry
            .iter()
            .filter(|(_, at)| **at <= now_ms)
            .map(|(s, _)| s.clone())
            .collect())
    }

    async fn claim_expired(&self, server: &str, now_ms: u64) -> StoreResult<bool> {
        let mut st = self.0.lock();
        if st.expiry.get(server).is_some_and(|at| *at <= now_ms) {
            st.expiry.remove(server);
            st.nodes.remove(server);
            return Ok(true);
        }
        Ok(false)
    }

    async fn live(&self, now_ms: u64) -> StoreResult<Vec<LiveNode>> {
        let mut st = self.0.lock();
        let live: Vec<(String, u64)> = st
            .expiry
            .iter()
            .filter(|(_, at)| **at > now_ms)
            .map(|(s, at)| (s.clone(), *at))
            .collect();
        Ok(live
            .into_iter()
            .map(|(server, expiry_ms)| {
                let rooms = st
                    .node_rooms(&server)
                    .map(|r| {
                        r.iter()
                            .filter(|(_, n)| **n > 0)
                            .map(|(k, n)| (k.clone(), *n))
                            .collect()
                    })
                    .unwrap_or_default();
                let info = st.nodes.get(&server).cloned().unwrap_or_else(|| NodeInfo {
                    server: server.clone(),
                    ..NodeInfo::default()
                });
                LiveNode {
                    info,
                    expiry_ms,
                    rooms,
                }
            })
            .collect())
    }
}

#[async_trait]
impl Directory for Memory {
    async fn member_count(&self, room: &str) -> StoreResult<u64> {
        Ok(self
            .0
            .lock()
            .members
            .get(room)
            .map_or(0, |m| m.len() as u64))
    }

    async fn scan_members(
        &self,
        room: &str,
        _cursor: u64,
        _count: usize,
    ) -> StoreResult<(u64, Vec<(i64, i64)>)> {
        // Like a small Redis hash: one batch holds everything and the cursor ends at once.
        let st = self.0.lock();
        let members = st
            .members
            .get(room)
            .map(|m| {
                m.iter()
                    .filter_map(|(mid, n)| Some((mid.parse().ok()?, *n)))
                    .collect()
            })
            .unwrap_or_default();
        Ok((0, members))
    }

    async fn names(&self, mids: &[i64]) -> StoreResult<Vec<Option<String>>> {
        let st = self.0.lock();
        Ok(mids.iter().map(|m| st.names.get(m).cloned()).collect())
    }

    async fn sign_in(&self, name: &str, first_mid: i64) -> StoreResult<i64> {
        let mut st = self.0.lock();
        if let Some(m) = st.mids_by_name.get(name).copied() {
            st.names.insert(m, name.to_string());
            return Ok(m);
        }
        let n = (st.next_mid + 1).max(first_mid);
        st.next_mid = n;
        st.mids_by_name.insert(name.to_string(), n);
        st.names.insert(n, name.to_string());
        Ok(n)
    }
}

#[async_trait]
impl crate::store::JobStatus for Memory {
    /// Streams as appended (nothing reads them in memory: no group, lag or lease).
    async fn partitions(&self, count: u16) -> StoreResult<Vec<crate::store::PartitionView>> {
        let st = self.0.lock();
        Ok((0..count)
            .map(|p| {
                let n = st.streams.get(&p).map_or(0, Vec::len) as u64;
                crate::store::PartitionView {
                    partition: p,
                    length: n,
                    added: n,
                    ..Default::default()
                }
            })
            .collect())
    }

    async fn workers(&self, _now_ms: u64) -> StoreResult<Vec<crate::store::WorkerView>> {
        Ok(Vec::new())
    }
}

#[async_trait]
impl Health for Memory {
    async fn ping(&self, _within: Duration) -> Result<(), String> {
        Ok(())
    }
}
