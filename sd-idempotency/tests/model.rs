//! Property test: random interleavings of claim, extend, complete, release, expiry and
//! sweep on the memory store, checked step by step against a small model.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use proptest::prelude::*;
use sd_idempotency::{
    Claim, ClaimOutcome, Error, Fingerprint, ManualClock, MemoryStore, Store, StoredResponse,
};

const LOCK: u64 = 30;
const RETENTION: u64 = 50;
/// In-flight records outlive their lock by a minute.
const GRACE: u64 = 60_000;

#[derive(Debug, Clone)]
enum Op {
    Claim { fp: u8 },
    Complete { which: usize, body: u8 },
    Release { which: usize },
    Extend { which: usize },
    Advance { ms: u64 },
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..2).prop_map(|fp| Op::Claim { fp }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(which, body)| Op::Complete { which, body }),
        1 => any::<usize>().prop_map(|which| Op::Release { which }),
        1 => any::<usize>().prop_map(|which| Op::Extend { which }),
        2 => (0u64..70).prop_map(|ms| Op::Advance { ms }),
        1 => (59_950u64..60_050).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Sweep),
    ]
}

/// The model: what one key's record should be.
#[derive(Debug, Clone)]
struct Rec {
    fp: u8,
    epoch: u64,
    holder: usize,
    lock_until: u64,
    expires_at: u64,
    body: Option<u8>,
}

#[derive(Debug, Default)]
struct Model {
    rec: Option<Rec>,
    now: u64,
}

impl Model {
    fn live(&self) -> Option<&Rec> {
        self.rec.as_ref().filter(|r| r.expires_at > self.now)
    }

    fn holds(&self, id: usize) -> bool {
        self.live()
            .is_some_and(|r| r.holder == id && r.body.is_none() && r.lock_until > self.now)
    }
}

fn fingerprint(fp: u8) -> Fingerprint {
    Fingerprint::of([fp])
}

fn run(ops: Vec<Op>) {
    let clock = ManualClock::new();
    clock.advance(Duration::from_millis(1000));
    let store = MemoryStore::with_clock(clock.clone());
    let mut model = Model {
        rec: None,
        now: 1000,
    };
    let mut claims: Vec<Claim> = Vec::new();
    let lock = Duration::from_millis(LOCK);
    for op in ops {
        match op {
            Op::Claim { fp } => {
                let got = block_on(store.claim("scope", "key", &fingerprint(fp), lock)).unwrap();
                let now = model.now;
                match model.live().cloned() {
                    Some(r) if r.fp != fp => assert_eq!(got, ClaimOutcome::Mismatch),
                    Some(Rec { body: Some(b), .. }) => {
                        let ClaimOutcome::Completed(resp) = got else {
                            panic!("expected a replay, got {got:?}")
                        };
                        assert_eq!(resp.body, vec![b]);
                    }
                    Some(r) if r.lock_until > now => assert_eq!(
                        got,
                        ClaimOutcome::InFlight {
                            retry_after: Duration::from_millis(r.lock_until - now)
                        }
                    ),
                    other => {
                        let epoch = match (other, &model.rec) {
                            (Some(r), _) => r.epoch + 1,
                            (None, Some(r)) => r.epoch + 1,
                            (None, None) => 1,
                        };
                        let ClaimOutcome::Claimed(claim) = got else {
                            panic!("expected a claim, got {got:?}")
                        };
                        assert_eq!(claim.epoch(), epoch);
                        claims.push(claim);
                        model.rec = Some(Rec {
                            fp,
                            epoch,
                            holder: claims.len() - 1,
                            lock_until: now + LOCK,
                            expires_at: now + LOCK + GRACE,
                            body: None,
                        });
                    }
                }
            }
            Op::Complete { .. } | Op::Release { .. } | Op::Extend { .. } if claims.is_empty() => {}
            Op::Complete { which, body } => {
                let id = which % claims.len();
                let response = StoredResponse::new(201, vec![body]);
                let got = block_on(store.complete(
                    &claims[id],
                    &response,
                    Duration::from_millis(RETENTION),
                ));
                check_holder(&model, id, &got);
                if got.is_ok() {
                    let now = model.now;
                    let r = model.rec.as_mut().unwrap();
                    r.body = Some(body);
                    r.expires_at = now + RETENTION;
                }
            }
            Op::Release { which } => {
                let id = which % claims.len();
                let got = block_on(store.release(&claims[id]));
                check_holder(&model, id, &got);
                if got.is_ok() {
                    model.rec = None;
                }
            }
            Op::Extend { which } => {
                let id = which % claims.len();
                let got = block_on(store.extend(&claims[id], lock));
                check_holder(&model, id, &got);
                if got.is_ok() {
                    let now = model.now;
                    let r = model.rec.as_mut().unwrap();
                    r.lock_until = now + LOCK;
                    r.expires_at = now + LOCK + GRACE;
                }
            }
            Op::Advance { ms } => {
                clock.advance(Duration::from_millis(ms));
                model.now += ms;
            }
            Op::Sweep => {
                let got = block_on(store.sweep()).unwrap();
                let expired = model
                    .rec
                    .as_ref()
                    .is_some_and(|r| r.expires_at <= model.now);
                assert_eq!(got, u64::from(expired));
                if expired {
                    model.rec = None;
                }
            }
        }
        // At most one claim holds the key at any time.
        let holders = claims
            .iter()
            .enumerate()
            .filter(|(i, _)| model.holds(*i))
            .count();
        assert!(holders <= 1);
    }
}

fn check_holder(model: &Model, id: usize, got: &Result<(), Error>) {
    if model.holds(id) {
        assert!(got.is_ok(), "holder {id} refused: {got:?}");
    } else {
        assert!(
            matches!(got, Err(Error::ClaimLost { .. })),
            "non-holder {id} accepted: {got:?}"
        );
    }
}

/// The memory store answers with ready futures: one poll finishes them.
fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(f).poll(&mut cx) {
        std::task::Poll::Ready(t) => t,
        std::task::Poll::Pending => panic!("the memory store never waits"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn memory_store_follows_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}

#[test]
fn late_complete_after_takeover_is_refused() {
    let clock = ManualClock::new();
    let store = MemoryStore::with_clock(clock.clone());
    let fp = Fingerprint::of("charge 10 EUR");
    let lock = Duration::from_secs(30);
    let first = match block_on(store.claim("alice", "k1", &fp, lock)).unwrap() {
        ClaimOutcome::Claimed(c) => c,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        block_on(store.claim("alice", "k1", &fp, lock)).unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    clock.advance(Duration::from_secs(31));
    let second = match block_on(store.claim("alice", "k1", &fp, lock)).unwrap() {
        ClaimOutcome::Claimed(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(second.epoch(), first.epoch() + 1);
    let response = StoredResponse::new(201, "ok");
    let late = block_on(store.complete(&first, &response, Duration::from_secs(60)));
    assert!(matches!(late, Err(Error::ClaimLost { epoch: 1, .. })));
    block_on(store.complete(&second, &response, Duration::from_secs(60))).unwrap();
}
