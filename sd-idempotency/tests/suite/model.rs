//! Property test: random interleavings of claim, extend, complete, release, the passing of
//! time and sweep on one key, run against a backend and checked step by step against a
//! model of the record.
//!
//! Real servers read their own clocks, so the model does not know a call's time exactly:
//! it knows it lies between the local clock read before and after the call (widened by a
//! few milliseconds of slack), and it keeps every lock and expiry as such a span. Where a
//! span straddles the call's time both answers are accepted, and the store's answer
//! decides how the model goes on. On the memory store's manual clock the spans are exact.
//!
//! After each step, every claim the model says cannot hold the key tries to extend it,
//! and the store must refuse: at most one claim is ever accepted as the holder.
#![allow(unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sd_idempotency::{Claim, ClaimOutcome, Error, Fingerprint, Store, StoredResponse};

use super::Pass;

/// In-flight records outlive their lock by a minute (`ABANDONED_GRACE`).
const GRACE: u64 = 60_000;

#[derive(Debug, Clone)]
pub enum Op {
    Claim { fp: u8 },
    Complete { which: usize, body: u8 },
    Release { which: usize },
    Extend { which: usize },
    Advance { ms: u64 },
    Sweep,
}

/// Sequences of up to `len` operations; time advances by up to `max_advance_ms`, and by
/// about the abandoned-record grace when `grace` (only a manual clock can wait that long).
pub fn ops(len: usize, max_advance_ms: u64, grace: bool) -> impl Strategy<Value = Vec<Op>> {
    let short = (0..max_advance_ms).prop_map(|ms| Op::Advance { ms });
    let advance = if grace {
        prop_oneof![2 => short, 1 => (GRACE - 50..GRACE + 50).prop_map(|ms| Op::Advance { ms })]
            .boxed()
    } else {
        short.boxed()
    };
    let op = prop_oneof![
        3 => (0u8..2).prop_map(|fp| Op::Claim { fp }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(which, body)| Op::Complete { which, body }),
        1 => any::<usize>().prop_map(|which| Op::Release { which }),
        1 => any::<usize>().prop_map(|which| Op::Extend { which }),
        2 => advance,
        1 => Just(Op::Sweep),
    ];
    proptest::collection::vec(op, 1..len)
}

/// How a backend behaves where backends may differ, and how its time is read.
pub struct Backend {
    pub lock: Duration,
    pub retention: Duration,
    /// Records past their expiry are gone at once (Redis expires keys itself), so the
    /// next claim starts again at epoch 1; elsewhere they stay until swept and the next
    /// claim takes the epoch after theirs.
    pub expiry_forgets: bool,
    /// `sweep` counts what it deleted (memory, PostgreSQL); Redis has nothing to sweep.
    pub sweep_counts: bool,
    /// Milliseconds of uncertainty on each side of a call's local time.
    pub slack: u64,
    /// The time in milliseconds, as the store reads it.
    pub now: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Lets time pass.
    pub pass: Pass,
}

/// The wall clock in milliseconds, what Redis's `TIME` and PostgreSQL's
/// `clock_timestamp()` read on this machine.
pub fn wall_clock() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `cases` random sequences, each on a fresh store from `make`.
pub fn check<S: Store>(
    runtime: &tokio::runtime::Runtime,
    cases: u32,
    strategy: impl Strategy<Value = Vec<Op>>,
    make: impl Fn() -> (S, Backend),
) {
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 256,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&strategy, |ops| {
        let (store, backend) = make();
        runtime.block_on(run(&store, &backend, ops));
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// A time known to lie within `lo..=hi` milliseconds.
#[derive(Debug, Clone, Copy)]
struct Span {
    lo: u64,
    hi: u64,
}

impl Span {
    fn plus(self, ms: u64) -> Span {
        Span {
            lo: self.lo + ms,
            hi: self.hi + ms,
        }
    }
}

/// Whether a deadline in `deadline` may still be ahead at a call in `t` (live), and
/// whether it may have passed.
fn may(deadline: Span, t: Span) -> (bool, bool) {
    (deadline.hi > t.lo, deadline.lo <= t.hi)
}

/// The model of the key's record.
#[derive(Debug, Clone)]
struct Rec {
    fp: u8,
    epoch: u64,
    holder: usize,
    lock: Span,
    expires: Span,
    body: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Claimed(u64),
    InFlight,
    Completed(u8),
    Mismatch,
}

struct Model<'a> {
    rec: Option<Rec>,
    backend: &'a Backend,
}

impl Model<'_> {
    /// The answers a claim with `fp` may get at `t`.
    fn claim(&self, fp: u8, t: Span) -> Vec<Expect> {
        let Some(r) = &self.rec else {
            return vec![Expect::Claimed(1)];
        };
        let (present, gone) = may(r.expires, t);
        let mut out = Vec::new();
        if gone {
            let epoch = if self.backend.expiry_forgets {
                1
            } else {
                r.epoch + 1
            };
            out.push(Expect::Claimed(epoch));
        }
        if present {
            if r.fp != fp {
                out.push(Expect::Mismatch);
            } else if let Some(b) = r.body {
                out.push(Expect::Completed(b));
            } else {
                let (locked, free) = may(r.lock, t);
                if locked {
                    out.push(Expect::InFlight);
                }
                if free {
                    out.push(Expect::Claimed(r.epoch + 1));
                }
            }
        }
        out
    }

    /// Whether claim `id` may hold the key at `t`, and whether it may not.
    fn holds(&self, id: usize, t: Span) -> (bool, bool) {
        match &self.rec {
            Some(r) if r.holder == id && r.body.is_none() => may(r.lock, t),
            _ => (false, true),
        }
    }

    /// Claim `id` was refused at `t`: if it was the holder, its lock had run out by then.
    fn refused(&mut self, id: usize, t: Span) {
        if let Some(r) = self.rec.as_mut().filter(|r| r.holder == id) {
            r.lock.hi = r.lock.hi.min(t.hi);
            r.lock.lo = r.lock.lo.min(r.lock.hi);
        }
    }
}

async fn timed<T>(backend: &Backend, call: impl Future<Output = T>) -> (T, Span) {
    let before = (backend.now)();
    let out = call.await;
    let after = (backend.now)();
    let t = Span {
        lo: before.saturating_sub(backend.slack),
        hi: after
            + if backend.slack > 0 {
                1 + backend.slack
            } else {
                0
            },
    };
    (out, t)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::of([fp])
}

/// One sequence of `ops` on `store`, checked step by step.
pub async fn run<S: Store>(store: &S, backend: &Backend, ops: Vec<Op>) {
    let scope = sd_testkit::unique_name("model");
    let (lock, retention) = (backend.lock, backend.retention);
    let mut model = Model { rec: None, backend };
    let mut claims: Vec<Claim> = Vec::new();
    for op in ops {
        match op {
            Op::Claim { fp } => {
                let (got, t) =
                    timed(backend, store.claim(&scope, "key", &fingerprint(fp), lock)).await;
                let got = got.unwrap();
                let allowed = model.claim(fp, t);
                let seen = match &got {
                    ClaimOutcome::Claimed(c) => Expect::Claimed(c.epoch()),
                    ClaimOutcome::InFlight { retry_after } => {
                        let r = model.rec.as_ref().expect("in flight without a record");
                        let left = ms(*retry_after);
                        assert!(
                            left <= r.lock.hi.saturating_sub(t.lo)
                                && left >= r.lock.lo.saturating_sub(t.hi),
                            "retry after {left} ms, lock until {:?}, now {t:?}",
                            r.lock
                        );
                        Expect::InFlight
                    }
                    ClaimOutcome::Completed(response) => {
                        assert_eq!(response.status, 201);
                        assert_eq!(response.body.len(), 1, "{response:?}");
                        Expect::Completed(response.body[0])
                    }
                    ClaimOutcome::Mismatch => Expect::Mismatch,
                    other => panic!("unknown outcome {other:?}"),
                };
                assert!(
                    allowed.contains(&seen),
                    "claim fp {fp} at {t:?}: got {seen:?}, expected one of {allowed:?}; record {:?}",
                    model.rec
                );
                if let ClaimOutcome::Claimed(claim) = got {
                    claims.push(claim);
                    let lock_until = t.plus(ms(lock));
                    model.rec = Some(Rec {
                        fp,
                        epoch: seen_epoch(&seen),
                        holder: claims.len() - 1,
                        lock: lock_until,
                        expires: lock_until.plus(ms(lock).max(GRACE)),
                        body: None,
                    });
                }
            }
            Op::Complete { .. } | Op::Release { .. } | Op::Extend { .. } if claims.is_empty() => {}
            Op::Complete { which, body } => {
                let id = which % claims.len();
                let response = StoredResponse::new(201, vec![body]);
                let (got, t) =
                    timed(backend, store.complete(&claims[id], &response, retention)).await;
                if check_holder(&mut model, id, t, &got) {
                    let r = model.rec.as_mut().unwrap();
                    r.body = Some(body);
                    r.expires = t.plus(ms(retention));
                }
            }
            Op::Release { which } => {
                let id = which % claims.len();
                let (got, t) = timed(backend, store.release(&claims[id])).await;
                if check_holder(&mut model, id, t, &got) {
                    model.rec = None;
                }
            }
            Op::Extend { which } => {
                let id = which % claims.len();
                let (got, t) = timed(backend, store.extend(&claims[id], lock)).await;
                if check_holder(&mut model, id, t, &got) {
                    let r = model.rec.as_mut().unwrap();
                    r.lock = t.plus(ms(lock));
                    r.expires = r.lock.plus(ms(lock).max(GRACE));
                }
            }
            Op::Advance { ms } => (backend.pass)(Duration::from_millis(ms)).await,
            Op::Sweep => {
                let (got, t) = timed(backend, store.sweep()).await;
                let got = got.unwrap();
                if !backend.sweep_counts {
                    assert_eq!(got, 0);
                    continue;
                }
                let (present, gone) = match &model.rec {
                    Some(r) => may(r.expires, t),
                    None => (true, false),
                };
                match got {
                    0 => assert!(present, "sweep kept an expired record: {:?}", model.rec),
                    1 => {
                        assert!(gone, "sweep deleted a live record: {:?}", model.rec);
                        model.rec = None;
                    }
                    n => panic!("sweep deleted {n} records of one key"),
                }
            }
        }
        // At most one holder, on the store's word: every claim that cannot hold the key
        // is refused.
        for (id, claim) in claims.iter().enumerate() {
            // The claim that may still hold is left alone: an extend would renew it.
            let (can_hold, _) = model.holds(id, Span { lo: 0, hi: 0 });
            if can_hold {
                continue;
            }
            let (got, _) = timed(backend, store.extend(claim, lock)).await;
            assert!(
                matches!(got, Err(Error::ClaimLost { .. })),
                "claim {id} cannot hold the key but the store accepted it: {got:?}; record {:?}",
                model.rec
            );
        }
    }
}

fn seen_epoch(seen: &Expect) -> u64 {
    match seen {
        Expect::Claimed(epoch) => *epoch,
        _ => unreachable!(),
    }
}

/// Checks a holder-only call of claim `id` at `t`; true when it was accepted.
fn check_holder(model: &mut Model<'_>, id: usize, t: Span, got: &Result<(), Error>) -> bool {
    let (can_hold, can_not) = model.holds(id, t);
    match got {
        Ok(()) => {
            assert!(
                can_hold,
                "claim {id} accepted at {t:?}; record {:?}",
                model.rec
            );
            true
        }
        Err(Error::ClaimLost { .. }) => {
            assert!(
                can_not,
                "holder {id} refused at {t:?}; record {:?}",
                model.rec
            );
            model.refused(id, t);
            false
        }
        Err(other) => panic!("store failed: {other}"),
    }
}
