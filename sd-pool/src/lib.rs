//! Backpressured worker pool with per-key ordering, completion watermarks for stream
//! consumers, panic isolation and a graceful drain.
//!
//! # What it is
//!
//! A [`Pool`] runs async jobs on tokio tasks with two explicit bounds: at most
//! `workers` jobs run at once and at most `queue` accepted jobs wait.
//! When both are used up, [`Pool::submit`] waits (backpressure), [`Pool::try_submit`]
//! hands the job back, and [`Pool::submit_timeout`] does either. On top of that:
//!
//! - **Ordering modes** ([`Order`]): unordered; per key (serial within a key, concurrent
//!   across keys, a bounded backlog per key); serial.
//! - **Completion watermarks** ([`watermark`]): a job may carry `(partition, offset)`;
//!   [`Pool::watermark`] is the highest offset at or below which every job of that
//!   partition is done, so a consumer commits it and a crash replays instead of losing.
//!   A partition whose finished-but-not-committable window reaches
//!   `max_watermark_window` takes no more jobs until its head finishes.
//! - **Panic isolation**: a panic is caught on the worker, reported to the job's
//!   [`JobHandle`] as [`Error::Panicked`] (distinct from [`Error::Cancelled`]), counted,
//!   passed to the `on_panic` hook, and the worker takes the next job.
//! - **Lifecycle**: [`Pool::close`], [`Pool::drain`] (deadline; every accepted job
//!   finishes or is handed back), [`Pool::shutdown_now`] (abort; hands back what did not
//!   run). A job that submits into its own full pool gets [`Error::WouldDeadlock`].
//! - **Metrics** ([`Pool::metrics`]): queued, running, completed, failed, panicked,
//!   cancelled, time in queue, run time, peaks.
//! - **Redis Streams consumer** (feature `redis`): a consumer group feeding the pool,
//!   acknowledging in watermark order and reclaiming dead consumers' entries.
//!
//! # When to use it
//!
//! When work arrives faster than it can be done and memory must stay bounded: a stream
//! consumer, a fan-out of requests, a job runner that must finish what it accepted on
//! shutdown. When order matters per entity but not globally, use [`Order::PerKey`].
//!
//! When not: for CPU-bound work use rayon or `spawn_blocking` (jobs here are async and
//! share the tokio runtime); for a few futures in one task, `buffer_unordered` is
//! simpler; for durable jobs that must survive a process crash, use a persistent queue
//! (the Redis consumer here gives that for streams).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use sd_pool::{Job, Order, Pool};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = Pool::builder().workers(4).queue(64).order(Order::PerKey).build()?;
//! let mut handles = Vec::new();
//! for (offset, user) in ["ann", "bob", "ann", "cy"].into_iter().enumerate() {
//!     let job = Job::new(async move { format!("{user} #{offset}") })
//!         .with_key(user)
//!         .with_offset(0, offset as u64);
//!     handles.push(pool.submit(job).await?);
//! }
//! assert_eq!(handles.remove(2).await?, "ann #2");
//! let drained = pool.drain(Duration::from_secs(5)).await;
//! assert!(drained.is_complete());
//! assert_eq!(pool.watermark(0), Some(3));
//! assert_eq!(pool.metrics().completed, 4);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - No more than `workers` jobs run at once; no more than `queue`
//!   wait; no more than `max_key_backlog` wait behind one key; a partition's tracked
//!   offsets stay below `max_watermark_window` plus the jobs in flight. Nothing else is
//!   buffered.
//! - In [`Order::PerKey`], jobs with equal keys start in submission order, each after the
//!   previous one finished (keys are hashed to 64 bits; a collision only serialises two
//!   keys). [`Order::Serial`] does that for all jobs.
//! - A job accepted by `submit`/`try_submit` (an `Ok` handle) runs exactly once, unless
//!   `drain` or `shutdown_now` hands it back unrun or `shutdown_now` aborts it. Dropping
//!   a [`JobHandle`] does not cancel the job. `submit` is cancel-safe.
//! - The watermark never passes an offset whose job has not finished (completed,
//!   failed or panicked; a job handed back or aborted never counts as finished).
//! - **Redis consumer: at least once.** An entry is acknowledged (`XACK`) only after its
//!   job succeeded and every entry read before it has finished. If the consumer dies, its
//!   unacknowledged entries are reclaimed by another member of the group (`XAUTOCLAIM`
//!   after `min_idle`) and processed again, so a handler may see an entry twice and must
//!   be idempotent (or deduplicate by entry id). An entry whose handler failed or
//!   panicked is not acknowledged and is redelivered after `min_idle`.
//!   A Redis error (a restart, a timed-out response) ends `run` with the error and
//!   leaves the pool running; calling `run` again carries on where it stopped, so
//!   `loop { consumer.run(..) }` with a back-off survives an outage.
//!
//! # Figures
//!
//! From one run of `cargo bench -p sd-benches --bench pool` on a shared two-core machine
//! (load average ~4 during the run; tokio, 2 workers); each sd figure beside the peer's
//! from the same run. Ratio = peer time / sd time: above 1, sd is faster.
//!
//! | case | sd-pool | peer | ratio |
//! | --- | --- | --- | --- |
//! | 100,000 tiny jobs, 64 at once | 67.9 ms | `spawn` + `Semaphore` 105.6 ms | 1.55× |
//! | same | 67.9 ms | `buffer_unordered` 5.7 ms (one task, no spawn) | 0.08× |
//! | Parallel Consumer: 10,000 jobs of 0-5 ms, 100 at once, unordered | 375 ms | `spawn` + `Semaphore` 370 ms | 0.99× |
//! | same, per key, 1000 keys | 371 ms | ideal per key 366 ms; sd unordered 375 ms | 0.98×; 1.01× |
//! | same, per key, 100 keys | 419 ms | ideal per key 425 ms; sd unordered 375 ms | 1.01×; 0.89× |
//! | same, per key, 20 keys | 1956 ms | ideal per key 1871 ms; sd unordered 375 ms | 0.96×; 0.19× |
//! | same, per key, 10 keys | 3740 ms | floor (busiest key's work) 2601 ms | |
//! | first 1,000 of those jobs: 1 key / serial | 3860 / 3829 ms | floor 2472 ms | |
//!
//! *Ideal per key* is one task per key running that key's jobs in order, the jobs split
//! by key up front, each under a `Semaphore(100)` permit: the best schedule per-key order
//! allows, with no queue bound and no streaming producer. sd per key stays within 5% of
//! it at 20, 100 and 1000 keys. In steady state a worker takes the next queued job
//! without a spawn, which is why tiny jobs run faster than one task per job (this ratio
//! swings with the machine's load: 0.47× to 1.6× across earlier runs). The later run of
//! `scripts/bench.sh` on the otherwise idle machine (`benches/RESULTS.md`): tiny jobs
//! 81.4 ms against 81.2 ms (1.00×); per key over 1000 / 100 / 20 keys 0.99× / 0.98× /
//! 1.00× the ideal per-key schedule's speed, and 1.00× / 0.88× / 0.20× unordered's.
//!
//! Per key against unordered is arithmetic, not overhead. The 10,000 jobs hold 25 s of
//! work: at 100 at once, unordered needs at least 249 ms. With 20 keys each key runs its
//! ~500 jobs back to back, and the busiest key holds 1301 ms of work (~1250 ms on
//! average), so no scheduler that keeps per-key order finishes in under 5.2× unordered:
//! "within 1.2× of unordered with 20 keys" is impossible, and the yardstick is the ideal
//! per-key schedule above. Per key comes within 1.2× of unordered's time (a ratio of
//! 0.83 or more) once the keys reach the concurrency (100 keys: 0.89×, 1000 keys:
//! 1.01×), as in Parallel Consumer. tokio's timer fires on millisecond ticks, so each job of a serial chain
//! costs ~1 ms more than its sleep (1 key: 3860 ms for 2472 ms of work); the 1-key and
//! serial cases run 1,000 jobs because at 10,000 one iteration takes ~30 s and criterion
//! takes at least 10.
//!
//! # Crate features
//!
//! None is on by default.
//!
//! - `redis`: [`redis::StreamConsumer`], a Redis Streams consumer group on top of the pool.
#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
mod pool;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
pub mod watermark;

pub use crate::error::{Error, Rejected, Result, UnexpectedReply};
pub use crate::pool::{
    Drained, IntoJob, Job, JobHandle, Metrics, Order, Outcome, OutputOf, PanicReport, Pool,
    PoolBuilder, ReturnedJob, Shutdown,
};
