//! What the operator page (`/admin`) shows, in one answer: the live comets with their load and
//! rooms, the most populated rooms, each push partition's stream and lag with the job worker
//! holding it, the live workers, cluster-wide totals the page turns into rates, and this logic
//! instance's recent refusals.

use serde_json::{Value, json};

use crate::App;
use crate::store::StoreError;

/// Rooms the page lists.
const TOP_ROOMS: usize = 10;

impl App {
    /// The operator page's data.
    pub(crate) async fn admin_state(&self) -> Result<Value, StoreError> {
        let now_ms = rim_runtime::unix_ms();
        let view = self.cluster_view().await?;
        let status = &self.store.job_status;
        let partitions = status.partitions(self.config.stream.partitions).await?;
        let workers = status.workers(now_ms).await?;

        let nodes: Vec<Value> = view
            .nodes
            .iter()
            .map(|n| {
                let mut v = crate::online::node_json(n);
                v["rooms"] = json!(n.rooms.values().filter(|c| **c > 0).count());
                v
            })
            .collect();

        let mut rooms: Vec<(String, u64)> =
            view.rooms().into_iter().filter(|(_, c)| *c > 0).collect();
        rooms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let room_count = rooms.len();
        rooms.truncate(TOP_ROOMS);

        // Job trims what it has delivered and acknowledged (up to the oldest entry still
        // pending), so what left the streams is what was delivered: exact once the trim catches
        // up, and its rate is the cluster's delivery rate.
        let added: u64 = partitions.iter().map(|p| p.added).sum();
        let delivered: u64 = partitions
            .iter()
            .map(|p| p.added.saturating_sub(p.length))
            .sum();
        let worker_list: Vec<Value> = workers
            .iter()
            .map(|w| {
                let held: Vec<u16> = partitions
                    .iter()
                    .filter(|p| p.holder.as_deref() == Some(w.id.as_str()))
                    .map(|p| p.partition)
                    .collect();
                json!({ "id": w.id, "expiry_ms": w.expiry_ms, "partitions": held })
            })
            .collect();
        let partition_list: Vec<Value> = partitions
            .iter()
            .map(|p| {
                json!({
                    "partition": p.partition,
                    "length": p.length,
                    "added": p.added,
                    "lag": p.lag,
                    "pending": p.pending,
                    "holder": p.holder,
                })
            })
            .collect();

        Ok(json!({
            "now_ms": now_ms,
            "nodes": nodes,
            "rooms": rooms.iter().map(|(r, c)| json!({"room": r, "count": c})).collect::<Vec<_>>(),
            "room_count": room_count,
            "sessions": view.nodes.iter().map(|n| n.info.connections).sum::<u64>(),
            "pushes": { "added": added, "delivered": delivered },
            "partitions": partition_list,
            "workers": worker_list,
            "refusals": self.refusals.recent(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::App;
    use crate::config::Config;

    #[tokio::test]
    async fn the_state_lists_partitions_and_counts_appended_pushes() {
        let (app, _) = App::in_memory(Config::dev());
        app.refusals
            .record("http", "401 no secret", "POST /goim/push/all");
        let s = app.admin_state().await.unwrap();
        let partitions = s["partitions"].as_array().unwrap();
        assert_eq!(partitions.len(), usize::from(app.config.stream.partitions));
        assert_eq!(s["pushes"]["added"], 0);
        assert_eq!(s["nodes"].as_array().unwrap().len(), 0);
        assert_eq!(s["refusals"][0]["reason"], "401 no secret");
    }
}
