//! The Redis backend: records shared by every replica of a service.
//!
//! - **One round trip per state change**: claim, complete, release and extend are each
//!   one `EVALSHA` of a Lua script (on `NOSCRIPT`, after a restart or failover, the
//!   script is sent once with `EVAL`). A replay is the claim's answer: one round trip.
//! - **Server time**: the scripts read Redis's `TIME`, so app servers with skewed clocks
//!   agree on lock expiry.
//! - **Expiry by Redis**: an in-flight record expires [`ABANDONED_GRACE`] (or one
//!   `lock_ttl`, when longer) after its lock; a completed one after its retention.
//!   [`Store::sweep`] has nothing to do.
//! - **Cluster-safe keys**: `{prefix}:{<sha256 of scope and key>}`; each script touches
//!   one key, so the same code runs on Redis Cluster.
//! - **Guarantee**: as strong as the Redis primary. A failover to a replica that missed
//!   the claim, or a restart without persistence, forgets claims and can let a duplicate
//!   run; use PostgreSQL when that is not acceptable.
//! - **Optional replication check**: with
//!   [`wait_for_replicas`](RedisStoreBuilder::wait_for_replicas), a claim, a completion
//!   or an extension counts only once `WAIT` says that many replicas hold it, so a
//!   failover that promotes one of them forgets none of them. One more round trip (and
//!   the replicas' acknowledgement) per state change.
//!
//! [`ABANDONED_GRACE`]: crate::store::ABANDONED_GRACE

use crate::observe::{Meters, Op};
use sd_core::observe::backend;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;
use sd_core::KeyPrefix;
use sd_core::deadline::timeout;
use sd_core::redis::{Replication, Script};

use crate::error::{Error, Result};
use crate::store::{
    Claim, ClaimOutcome, Fingerprint, Store, StoredResponse, call_timeout, new_token, ttl_ms,
};

const PRELUDE: &str = include_str!("redis/prelude.lua");

/// Each script is the shared prelude followed by its body.
fn script(body: &str) -> Script {
    Script::from_parts(&[PRELUDE, "\n", body])
}

static CLAIM: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/claim.lua")));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/complete.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/release.lua")));
static EXTEND: LazyLock<Script> = LazyLock::new(|| script(include_str!("redis/extend.lua")));
static CONFIRM: Script = Script::new(include_str!("redis/confirm.lua"));

/// `WAIT` for this many replicas, this long, before a state change counts.
#[derive(Debug, Clone, Copy)]
struct Replicas {
    count: u32,
    timeout: Duration,
}

/// Options of a [`RedisStore`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    prefix: String,
    timeout: Duration,
    name: String,
    replicas: Option<Replicas>,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        RedisStoreBuilder {
            prefix: "idem".into(),
            timeout: Duration::from_secs(1),
            name: sd_core::observe::DEFAULT_NAME.into(),
            replicas: None,
        }
    }
}

impl RedisStoreBuilder {
    /// The key prefix (default `idem`); keys are `{prefix}:{{digest}}`, sd adds the
    /// colon. Checked by [`build`](Self::build) against sd's one rule (`KeyPrefix`): no
    /// `{`, `}` or trailing `:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one call waits for Redis (default 1 s) before [`Error::Timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The store's name (default `"default"`): the `sd.name` label of its metrics
    /// (feature `metrics`) and field of its spans.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Off by default. When set, a claim, a completion or an extension counts only once
    /// `count` replicas acknowledged it: after its script, one more request to the
    /// record's master writes the record's token again unchanged (if the record is still
    /// the claim's) and sends `WAIT count timeout` (milliseconds, rounded up) behind it.
    /// Fewer acknowledgements within `timeout` is [`Error::NotReplicated`]: a claim is
    /// released again (best effort) and must not run, a completion or an extension is on
    /// the master only; a record that vanished from the master meanwhile counts as 0
    /// replicas (a claim) or [`Error::ClaimLost`]. The wait adds to the call
    /// [`timeout`](Self::timeout), and must stay below the connection's own response
    /// timeout (2 s for sd-core's `FailoverConnection`). Releases are not waited for:
    /// a lost release only keeps the key locked until its lock expires.
    ///
    /// What it promises: a claim you got, and a completion that returned `Ok`, were in
    /// the memory of `count` replicas, so a failover that promotes one of them keeps
    /// them, and a retry neither claims the key again nor runs it twice.
    ///
    /// What it does not: it is not durability on disk (a replica that restarts without
    /// persistence forgets them); a failover may still promote a replica that missed a
    /// write when `count` is below the number of replicas (Sentinel and Cluster prefer
    /// the most up-to-date replica, but do not know about `WAIT`); writes can still be
    /// lost in a partition, and `WAIT` does not make Redis a consensus system. Use
    /// PostgreSQL when a duplicate run is not acceptable. Some managed services refuse
    /// or restrict `WAIT` (Huawei Cloud DCS disables it on its Redis 4.0 Proxy Cluster
    /// instances; a Redis Enterprise database has one replica to wait for); where it is
    /// refused every claim fails with [`Error::Backend`]. `count` 0 or a zero `timeout` fails [`build`](Self::build)
    /// with field `wait_for_replicas`.
    pub fn wait_for_replicas(mut self, count: u32, timeout: Duration) -> Self {
        self.replicas = Some(Replicas { count, timeout });
        self
    }

    /// A store on `conn`: a `ConnectionManager` or `MultiplexedConnection` for one
    /// server, a `cluster_async::ClusterConnection` for a cluster.
    pub fn build<C: ConnectionLike + Clone + Send + Sync>(self, conn: C) -> Result<RedisStore<C>> {
        let prefix = KeyPrefix::parse("prefix", &self.prefix)?;
        let timeout = call_timeout(self.timeout)?;
        if let Some(replicas) = self.replicas {
            if replicas.count == 0 {
                return Err(Error::config(
                    "wait_for_replicas",
                    "wait for at least 1 replica, or leave it unset to not wait",
                ));
            }
            if replicas.timeout.is_zero() {
                return Err(Error::config(
                    "wait_for_replicas",
                    "the timeout must be above zero (`WAIT` with 0 blocks for ever)",
                ));
            }
        }
        Ok(RedisStore {
            conn,
            prefix,
            timeout,
            replicas: self.replicas,
            meters: Meters::new(&self.name, backend::REDIS),
            name: self.name,
        })
    }
}

/// Records in Redis; see the [module docs](self).
#[derive(Clone)]
pub struct RedisStore<C> {
    conn: C,
    prefix: KeyPrefix,
    timeout: Duration,
    replicas: Option<Replicas>,
    meters: Meters,
    name: String,
}

impl<C> std::fmt::Debug for RedisStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl RedisStore<()> {
    /// Options: prefix `idem`, 1 s timeout.
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync> RedisStore<C> {
    /// The Redis key of `(scope, key)`.
    pub fn redis_key(&self, scope: &str, key: &str) -> String {
        let digest = Fingerprint::of_parts([scope, key]).to_hex();
        self.prefix.tagged(&digest[..40])
    }

    async fn eval(
        &self,
        op: Op,
        script: &Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<redis::Value> {
        let mut call = script.call(1);
        call.arg(key);
        for arg in args {
            call.arg(*arg);
        }
        let mut conn = self.conn.clone();
        let span = tracing::debug_span!(
            "idempotency.redis",
            sd.name = %self.name,
            sd.backend = backend::REDIS,
            sd.operation = op.name(),
        );
        let start = std::time::Instant::now();
        let reply = timeout(self.timeout, span, call.invoke(&mut conn)).await;
        self.meters.called(op, start);
        Ok(reply??)
    }

    /// With `wait_for_replicas`: whether `claim`'s record is held by the replicas asked
    /// for. `Ok(None)` when it is (or nothing is asked); `Ok(Some(acked))` when too few
    /// acknowledged, or the record is gone (`acked` 0).
    async fn replicated(&self, op: Op, claim: &Claim) -> Result<Option<(u32, bool)>> {
        let Some(replicas) = self.replicas else {
            return Ok(None);
        };
        let token = claim.token.to_string();
        let epoch = claim.epoch.to_string();
        let mut call = CONFIRM.call(1);
        call.arg(self.redis_key(&claim.scope, &claim.key))
            .arg(token)
            .arg(epoch);
        let mut conn = self.conn.clone();
        let span = tracing::debug_span!(
            "idempotency.redis.wait",
            sd.name = %self.name,
            sd.backend = backend::REDIS,
            sd.operation = op.name(),
            replicas = replicas.count,
        );
        let waited =
            sd_core::redis::wait_for_replicas(&mut conn, &call, replicas.count, replicas.timeout);
        match timeout(self.timeout + replicas.timeout, span, waited).await?? {
            Replication::Acked(n) if n >= replicas.count => Ok(None),
            Replication::Acked(n) => Ok(Some((n, true))),
            Replication::Missing => Ok(Some((0, false))),
        }
    }

    /// [`replicated`](Self::replicated) as this crate's answer for a holder's change:
    /// `NotReplicated`, or `ClaimLost` when the record is no longer the claim's.
    async fn holder_replicated(&self, op: Op, claim: &Claim) -> Result<()> {
        let wanted = self.replicas.map_or(0, |r| r.count);
        match self.replicated(op, claim).await? {
            None => Ok(()),
            Some((acked, true)) => Err(Error::NotReplicated { acked, wanted }),
            Some((_, false)) => Err(claim.lost()),
        }
    }

    async fn as_holder(
        &self,
        op: Op,
        script: &Script,
        claim: &Claim,
        extra: &[&[u8]],
    ) -> Result<()> {
        let token = claim.token.to_string();
        let epoch = claim.epoch.to_string();
        let mut args: Vec<&[u8]> = vec![token.as_bytes(), epoch.as_bytes()];
        args.extend_from_slice(extra);
        let key = self.redis_key(&claim.scope, &claim.key);
        match self.eval(op, script, &key, &args).await? {
            redis::Value::Int(1) => self.holder_replicated(op, claim).await,
            redis::Value::Int(0) => Err(claim.lost()),
            other => Err(Error::corrupt(format!("unexpected script reply {other:?}"))),
        }
    }
}

impl<C: ConnectionLike + Clone + Send + Sync> RedisStore<C> {
    /// With `wait_for_replicas`: a new claim counts once its replicas hold it; if they
    /// do not, it is released again (best effort) and the claim fails.
    async fn claim_replicated(&self, claim: &Claim) -> Result<()> {
        let Some((acked, present)) = self.replicated(Op::Claim, claim).await? else {
            return Ok(());
        };
        if present && let Err(error) = self.release(claim).await {
            tracing::debug!(%error, "releasing a claim its replicas did not acknowledge");
        }
        Err(Error::NotReplicated {
            acked,
            wanted: self.replicas.map_or(0, |r| r.count),
        })
    }
}

fn decode_claim(reply: redis::Value, claim: impl FnOnce(u64) -> Claim) -> Result<ClaimOutcome> {
    use redis::Value;
    let items = match reply {
        Value::Array(items) => items,
        other => return Err(Error::corrupt(format!("unexpected claim reply {other:?}"))),
    };
    let tag = match items.first() {
        Some(Value::BulkString(tag)) => tag.as_slice(),
        Some(Value::SimpleString(tag)) => tag.as_bytes(),
        _ => return Err(Error::corrupt("claim reply without a tag")),
    };
    match (tag, items.get(1)) {
        (b"claimed", Some(Value::Int(epoch))) => Ok(ClaimOutcome::Claimed(claim(
            u64::try_from(*epoch).map_err(|_| Error::corrupt("negative epoch"))?,
        ))),
        (b"inflight", Some(Value::Int(ms))) => Ok(ClaimOutcome::InFlight {
            retry_after: Duration::from_millis(u64::try_from(*ms).unwrap_or(0)),
        }),
        (b"completed", Some(Value::BulkString(bytes))) => {
            Ok(ClaimOutcome::Completed(StoredResponse::from_bytes(bytes)?))
        }
        (b"completed", _) => Err(Error::corrupt("completed record without a response")),
        (b"mismatch", _) => Ok(ClaimOutcome::Mismatch),
        _ => Err(Error::corrupt("unknown claim reply")),
    }
}

impl<C: ConnectionLike + Clone + Send + Sync> Store for RedisStore<C> {
    async fn claim(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<ClaimOutcome> {
        let ttl = ttl_ms("lock_ttl", lock_ttl)?.to_string();
        let token = new_token();
        let token_arg = token.to_string();
        let args: [&[u8]; 3] = [fingerprint.as_bytes(), ttl.as_bytes(), token_arg.as_bytes()];
        let reply = self
            .eval(Op::Claim, &CLAIM, &self.redis_key(scope, key), &args)
            .await?;
        let mut answer = decode_claim(reply, |epoch| Claim {
            scope: scope.to_owned(),
            key: key.to_owned(),
            epoch,
            token,
        });
        if let Ok(ClaimOutcome::Claimed(claim)) = &answer {
            answer = self.claim_replicated(claim).await.and(answer);
        }
        self.meters.claimed(&answer);
        answer
    }

    async fn complete(
        &self,
        claim: &Claim,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<()> {
        let retention = ttl_ms("retention", retention)?.to_string();
        let bytes = response.to_bytes()?;
        self.as_holder(
            Op::Complete,
            &COMPLETE,
            claim,
            &[&bytes, retention.as_bytes()],
        )
        .await
    }

    async fn release(&self, claim: &Claim) -> Result<()> {
        let token = claim.token.to_string();
        let epoch = claim.epoch.to_string();
        let key = self.redis_key(&claim.scope, &claim.key);
        let args: [&[u8]; 2] = [token.as_bytes(), epoch.as_bytes()];
        // Not waited for: a lost release only keeps the key locked until its lock ends.
        match self.eval(Op::Release, &RELEASE, &key, &args).await? {
            redis::Value::Int(1) => Ok(()),
            redis::Value::Int(0) => Err(claim.lost()),
            other => Err(Error::corrupt(format!("unexpected script reply {other:?}"))),
        }
    }

    async fn extend(&self, claim: &Claim, lock_ttl: Duration) -> Result<()> {
        let ttl = ttl_ms("lock_ttl", lock_ttl)?.to_string();
        self.as_holder(Op::Extend, &EXTEND, claim, &[ttl.as_bytes()])
            .await
    }

    async fn sweep(&self) -> Result<u64> {
        Ok(0)
    }
}
