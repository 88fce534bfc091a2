//! Helpers shared by the pool's test binaries.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Each binary uses its own subset.

use std::sync::Arc;

use sd_pool::{IntoJob, JobHandle, Outcome, OutputOf, Pool};
use tokio::sync::Notify;

/// A pool of one worker and a queue of one whose worker is busy with a job that waits
/// for `gate`: returns the pool, the gate and that job's handle.
pub async fn held_pool() -> (Pool, Arc<Notify>, JobHandle<()>) {
    let pool = Pool::builder().workers(1).queue(1).build().unwrap();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    let running = pool
        .submit(async move { g.notified().await })
        .await
        .unwrap();
    tokio::task::yield_now().await;
    (pool, gate, running)
}

/// Why `pool` refuses `job` at once (`try_submit`); panics if it takes it.
pub fn refused<J>(pool: &Pool, job: J) -> sd_pool::Error
where
    J: IntoJob,
    J::Future: Send + 'static,
    OutputOf<J>: Outcome + Send + 'static,
{
    match pool.try_submit(job) {
        Ok(_) => panic!("the pool took the job"),
        Err(rejected) => rejected.error,
    }
}
