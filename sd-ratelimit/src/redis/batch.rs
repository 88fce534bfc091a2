//! Batching: concurrent single-limit decisions share one `EVALSHA`.

use super::*;

/// How many batches may be on the wire at once (see [`RedisLimiterBuilder::batch`]).
pub const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// One decision waiting for a batch.
struct Pending {
    key: String,
    args: [i64; 6],
    cost: u32,
    reply: oneshot::Sender<Result<Vec<i64>>>,
}

#[derive(Default)]
pub(super) struct BatchState {
    queue: Vec<Pending>,
    in_flight: usize,
}

/// Groups concurrent single-limit decisions into one `EVALSHA` (mode `each`).
///
/// The queue and the count of batches in flight share one lock, so a decision queued
/// while every slot is busy is always picked up by the batch that frees a slot.
pub(super) struct Batcher<C> {
    pub(super) conn: C,
    pub(super) timeout: Duration,
    pub(super) max: usize,
    /// The limiter's penalty in microseconds (zero: none).
    pub(super) penalty: u64,
    pub(super) state: Mutex<BatchState>,
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> Batcher<C> {
    /// Queues one decision and waits for its six numbers.
    pub(super) async fn decide(
        self: &Arc<Self>,
        key: String,
        args: [i64; 6],
        cost: u32,
    ) -> Result<Vec<i64>> {
        let (reply, answer) = oneshot::channel();
        self.lock().queue.push(Pending {
            key,
            args,
            cost,
            reply,
        });
        self.start();
        match timeout(self.timeout, tracing::Span::none(), answer).await {
            Ok(Ok(values)) => values,
            // The batch task ended without answering (its runtime shut down).
            Ok(Err(_)) => Err(Error::Timeout {
                after: self.timeout,
            }),
            Err(elapsed) => Err(elapsed.into()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BatchState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends the queued decisions if a slot is free.
    fn start(self: &Arc<Self>) {
        let batch: Vec<Pending> = {
            let mut state = self.lock();
            // A caller that gave up (timed out or dropped) is not decided: its request
            // would take capacity nobody uses.
            state.queue.retain(|p| !p.reply.is_closed());
            if state.in_flight >= MAX_BATCHES_IN_FLIGHT || state.queue.is_empty() {
                return;
            }
            state.in_flight += 1;
            let n = state.queue.len().min(self.max);
            state.queue.drain(..n).collect()
        };
        let this = Arc::clone(self);
        // A task of its own, so a caller that gives up does not cancel the others.
        tokio::spawn(async move {
            this.send(batch).await;
            this.lock().in_flight -= 1;
            this.start();
        });
    }

    async fn send(&self, batch: Vec<Pending>) {
        let span = tracing::debug_span!(
            "ratelimit.redis.batch",
            sd.backend = sd_core::observe::backend::REDIS,
            sd.operation = sd_core::observe::operation::DECIDE,
            decisions = batch.len(),
        );
        let call = each_call(&batch, self.penalty);
        let reply = timeout(self.timeout, span, invoke(&self.conn, &call)).await;
        match reply {
            Ok(Ok(values)) if values.len() == 6 * batch.len() => {
                for (p, v) in batch.into_iter().zip(values.chunks_exact(6)) {
                    let _ = p.reply.send(Ok(v.to_vec()));
                }
            }
            Ok(Err(e))
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::CrossSlot) =>
            {
                // Keys on several cluster slots: one command per decision.
                for p in batch {
                    let one = std::slice::from_ref(&p);
                    let call = each_call(one, self.penalty);
                    let reply = timeout(
                        self.timeout,
                        tracing::Span::none(),
                        invoke(&self.conn, &call),
                    )
                    .await;
                    let _ = p.reply.send(batch_reply(reply));
                }
            }
            reply => {
                let error = match batch_reply(reply) {
                    Ok(_) => Error::UnexpectedReply {
                        reason: "expected 6 integers per decision",
                    },
                    Err(e) => e,
                };
                for p in batch {
                    let _ = p.reply.send(Err(copy_error(&error)));
                }
            }
        }
    }
}

/// The same failure for every decision of a failed batch (a Redis error keeps its kind
/// and text; the client error itself cannot be cloned).
fn copy_error(e: &Error) -> Error {
    match e {
        Error::Timeout { after } => Error::Timeout { after: *after },
        Error::UnexpectedReply { reason } => Error::UnexpectedReply { reason },
        Error::Backend { backend, source } => {
            let kind = source
                .downcast_ref::<redis::RedisError>()
                .map_or(redis::ErrorKind::Client, redis::RedisError::kind);
            Error::Backend {
                backend,
                source: Box::new(redis::RedisError::from((
                    kind,
                    "the batch this decision was in failed",
                    source.to_string(),
                ))),
            }
        }
        other => redis::RedisError::from((
            redis::ErrorKind::Client,
            "the batch this decision was in failed",
            other.to_string(),
        ))
        .into(),
    }
}

/// The call deciding each pending decision on its own (`gcra.lua` when it can decide
/// them all, else `limit.lua` in mode `each`).
fn each_call(batch: &[Pending], penalty: u64) -> ScriptCall<'static> {
    let gcra = batch.iter().all(|p| gcra_only(&p.args));
    let keys: Vec<String> = batch.iter().map(|p| p.key.clone()).collect();
    let mut cmd = with_keys(if gcra { &GCRA } else { &SCRIPT }, &keys, penalty);
    cmd.arg("");
    if !gcra {
        cmd.arg("each");
    }
    cmd.arg(penalty);
    for p in batch {
        if gcra {
            cmd.arg(p.args[3]).arg(p.args[4]);
        } else {
            cmd.arg(&p.args[..]);
        }
        cmd.arg(p.cost);
    }
    cmd
}
