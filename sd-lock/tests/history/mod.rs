//! Raw events of fenced writes, and the checker that judges a whole history.
//!
//! Every attempt to write through a fence is one [`Event`]: who tried, with which token,
//! what value, what the fence answered, and when the call started and ended on
//! `CLOCK_MONOTONIC` (one clock for every process on the machine, so the events of a
//! child process and of the test's own tasks order together). The checker only uses
//! real-time order that is certain: `a.end < b.start`.
#![allow(dead_code, unreachable_pub, unsafe_code)]

use std::fmt;

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
