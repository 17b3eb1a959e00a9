//! [`PushStreams`] on Redis: one stream per partition (`rim:push:{p}`), one `job` field per
//! entry holding the MessagePack-encoded `PushJob`.

use async_trait::async_trait;
use rim_proto::job::PushJob;
use rim_proto::keys;

use super::{PushStreams, RedisConn, StoreResult};

#[async_trait]
impl PushStreams for RedisConn {
    async fn append(&self, entries: &[(u16, PushJob)]) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        if entries.len() > 1 {
            pipe.atomic();
        }
        for (p, job) in entries {
            pipe.cmd("XADD")
                .arg(keys::push_stream(*p))
                .arg("*")
                .arg(keys::JOB_FIELD)
                .arg(job.encode())
                .ignore();
        }
        self.pipe(&pipe).await
    }
}
