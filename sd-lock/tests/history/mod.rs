//! Raw events of fenced writes, and the checker that judges a whole history.
//!
//! Every attempt to write through a fence is one [`Event`]: who tried, with which token,
//! what value, what the fence answered, and when the call started and ended on
//! `CLOCK_MONOTONIC` (one clock for every process on the machine, so the events of a
//! child process and of the test's own tasks order together). The checker only uses
//! real-time order that is certain: `a.end < b.start`.
#![allow(dead_code, unreachable_pub, unsafe_code)]

use std::fmt;

pub mod child;
#[cfg(any(feature = "redis", feature = "postgres"))]
pub mod fence;

/// Nanoseconds on `CLOCK_MONOTONIC`, comparable across processes on this machine.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and CLOCK_MONOTONIC always exists on
    // Linux; clock_gettime writes only into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the fence answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The write was applied.
    Accepted,
    /// Refused as stale; the fence's newest token then.
    Refused { current: u64 },
    /// Any other error: the outcome is unknown (the write may or may not have landed).
    Failed,
}

/// One attempt to write through the fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub who: String,
    pub token: u64,
    pub value: String,
    pub outcome: Outcome,
    pub start: u64,
    pub end: u64,
}

const PREFIX: &str = "SDLOCK-EVENT";

impl fmt::Display for Event {
    /// One line: `SDLOCK-EVENT who token value outcome current start end`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (outcome, current) = match self.outcome {
            Outcome::Accepted => ("accepted", 0),
            Outcome::Refused { current } => ("refused", current),
            Outcome::Failed => ("failed", 0),
        };
        write!(
            f,
            "{PREFIX} {} {} {} {outcome} {current} {} {}",
            self.who, self.token, self.value, self.start, self.end
        )
    }
}

impl Event {
    /// Parses a line written by `Display`; `None` for any other line.
    pub fn parse(line: &str) -> Option<Event> {
        let mut f = line[line.find(PREFIX)?..].split_whitespace();
        f.next()?;
        let who = f.next()?.to_owned();
        let token = f.next()?.parse().ok()?;
        let value = f.next()?.to_owned();
        let outcome = f.next()?;
        let current = f.next()?.parse().ok()?;
        let outcome = match outcome {
            "accepted" => Outcome::Accepted,
            "refused" => Outcome::Refused { current },
            "failed" => Outcome::Failed,
            _ => return None,
        };
        let start = f.next()?.parse().ok()?;
        let end = f.next()?.parse().ok()?;
        Some(Event {
            who,
            token,
            value,
            outcome,
            start,
            end,
        })
    }

    pub fn accepted(&self) -> bool {
        self.outcome == Outcome::Accepted
    }
}

/// Runs `write` and records it as an event of `who`.
pub async fn record<F, E>(who: &str, token: u64, value: &str, write: F) -> Event
where
    F: std::future::Future<Output = Result<(), E>>,
    E: Into<sd_lock::Error>,
{
    let start = now_ns();
    let result = write.await.map_err(Into::into);
    let end = now_ns();
    let outcome = match result {
        Ok(()) => Outcome::Accepted,
        Err(sd_lock::Error::StaleToken { current, .. }) => Outcome::Refused { current: current.0 },
        Err(_) => Outcome::Failed,
    };
    Event {
        who: who.to_owned(),
        token,
        value: value.to_owned(),
        outcome,
        start,
        end,
    }
}

/// The fencing invariants over a whole history, whatever the faults:
///
/// (a) an accepted write carries a token >= that of every write accepted before it
///     started;
/// (b) no write is accepted while the fence already knew a newer token: every refusal
///     that ended before it started reported a `current` <= its token;
/// and the value the fence holds at the end (`final_value`) is that of an accepted write
/// with the newest accepted token, the last of them (a refused write changed nothing).
///
/// Panics naming the first violation and the events involved.
pub fn check_fencing(events: &[Event], final_value: Option<&str>) {
    let accepted: Vec<&Event> = events.iter().filter(|e| e.accepted()).collect();
    for w in &accepted {
        for before in events.iter().filter(|e| e.end < w.start) {
            match before.outcome {
                Outcome::Accepted => assert!(
                    w.token >= before.token,
                    "(a) fencing broken: {w} accepted after {before}"
                ),
                Outcome::Refused { current } => assert!(
                    w.token >= current,
                    "(b) write with a token older than the fence's current one accepted: \
                     {w} after {before}"
                ),
                Outcome::Failed => {}
            }
        }
    }
    if let Some(newest) = accepted.iter().map(|e| e.token).max() {
        let last = accepted
            .iter()
            .filter(|e| e.token == newest)
            .max_by_key(|e| e.end)
            .map(|e| e.value.as_str());
        assert_eq!(
            final_value, last,
            "(b) the fence holds a value other than the newest holder's last write"
        );
    }
}

/// A holder's span of certain accepted writes: from the end of its first accepted write
/// to the start of its last one (each write took effect somewhere inside its own call,
/// so the holder certainly wrote over that span). A holder is one (`who`, token).
fn certain_spans(events: &[Event]) -> Vec<(u64, u64, String, u64)> {
    let mut spans: std::collections::BTreeMap<(String, u64), (u64, u64)> = Default::default();
    for e in events.iter().filter(|e| e.accepted()) {
        let span = spans
            .entry((e.who.clone(), e.token))
            .or_insert((u64::MAX, 0));
        span.0 = span.0.min(e.end);
        span.1 = span.1.max(e.start);
    }
    spans
        .into_iter()
        .filter(|(_, (from, to))| from < to)
        .map(|((who, token), (from, to))| (from, to, who, token))
        .collect()
}

/// (e) Never more than `n` holders whose writes were accepted at once: no instant lies
/// strictly inside the certain spans of more than `n` holders. With `n` = 1 and holders
/// that are terms of an election, never two leaders writing at once.
///
/// Panics naming the holders that overlapped.
pub fn check_at_most(events: &[Event], n: usize) {
    let spans = certain_spans(events);
    // Ends sort before starts at the same instant: spans that only touch do not overlap.
    let mut edges: Vec<(u64, bool, usize)> = Vec::new();
    for (i, (from, to, _, _)) in spans.iter().enumerate() {
        edges.push((*from, true, i));
        edges.push((*to, false, i));
    }
    edges.sort();
    let mut open: Vec<usize> = Vec::new();
    for (_, starts, i) in edges {
        if starts {
            open.push(i);
            let list = || {
                open.iter()
                    .map(|&j| {
                        format!(
                            "{} token {} [{}, {}]",
                            spans[j].2, spans[j].3, spans[j].0, spans[j].1
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            assert!(
                open.len() <= n,
                "(e) {} holders had writes accepted at once, over the bound {n}: {}",
                open.len(),
                list()
            );
        } else {
            open.retain(|&j| j != i);
        }
    }
}

/// (f) Never two leaders in one term: every accepted write carrying a term's token came
/// from one `who`.
pub fn check_one_writer_per_token(events: &[Event]) {
    let mut writer: std::collections::BTreeMap<u64, &str> = Default::default();
    for e in events.iter().filter(|e| e.accepted()) {
        let first = *writer.entry(e.token).or_insert(&e.who);
        assert_eq!(
            first, e.who,
            "(f) two writers accepted in the term with token {}: {first} and {}",
            e.token, e.who
        );
    }
}

#[test]
fn certain_spans_overlap_only_when_both_certainly_wrote() {
    let ev = |who: &str, token, start, end| Event {
        who: who.to_owned(),
        token,
        value: "v".to_owned(),
        outcome: Outcome::Accepted,
        start,
        end,
    };
    // a's last write and b's first overlap in real time: not a certain overlap.
    let handover = [
        ev("a", 1, 0, 10),
        ev("a", 1, 20, 30),
        ev("b", 2, 25, 35),
        ev("b", 2, 40, 50),
    ];
    check_at_most(&handover, 1);
    // a still wrote well after b began: two at once.
    let both = [
        ev("a", 1, 0, 10),
        ev("b", 2, 12, 14),
        ev("a", 1, 20, 30),
        ev("b", 2, 40, 50),
    ];
    assert!(std::panic::catch_unwind(|| check_at_most(&both, 1)).is_err());
    check_at_most(&both, 2);
    check_one_writer_per_token(&both);
    let same_term = [ev("a", 1, 0, 10), ev("b", 1, 12, 14)];
    assert!(std::panic::catch_unwind(|| check_one_writer_per_token(&same_term)).is_err());
}
