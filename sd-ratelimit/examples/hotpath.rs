//! A small driver for instruction counts of the memory hot path, ours beside governor's,
//! for `valgrind --tool=callgrind` (instruction counts repeat under load, unlike times).
//!
//! ```text
//! cargo build --release -p sd-ratelimit --example hotpath
//! valgrind --tool=callgrind target/release/examples/hotpath sd-direct 100000 admit
//! ```
//!
//! Cases: `sd-direct` (reads `allowed`), `sd-direct-full` (reads every field), `sd-allow`, `gov-direct`, `sd-keyed`, `sd-keyed-allow`,
//! `gov-keyed`; quotas:
//! `bench` (the criterion bench's 1,000,000/s, burst 1000), `admit` (10^9/s: every
//! check admits, one compare-and-swap each) and `deny` (1 per hour: every check after
//! the first is denied). Count only the measured loop (setup, including the clock's
//! calibration, varies from run to run):
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='hotpath::measure*' target/release/examples/hotpath sd-direct 100000 deny
//! ```
#![allow(clippy::unwrap_used, missing_docs)] // A measurement driver: failures should stop it.

use std::hint::black_box;
use std::num::NonZeroU32;

use sd_ratelimit::memory::MemoryLimiterBuilder;
use sd_ratelimit::{Limit, Quota};

const KEYS: u64 = 10_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let case = args.next().unwrap_or_else(|| "sd-direct".into());
    let n: u64 = args.next().map_or(100_000, |s| s.parse().unwrap());
    let (rate, burst, per_hour) = match args.next().as_deref().unwrap_or("bench") {
        "bench" => (1_000_000, 1000, false),
        "admit" => (1_000_000_000, 1000, false),
        "deny" => (1, 1, true),
        other => panic!("unknown quota {other}"),
    };
    let (ours, theirs) = if per_hour {
        (
            Quota::per_hour(rate).unwrap(),
            governor::Quota::per_hour(NonZeroU32::new(rate).unwrap()),
        )
    } else {
        (
            Quota::per_second(rate).unwrap(),
            governor::Quota::per_second(NonZeroU32::new(rate).unwrap()),
        )
    };
    let ours = Limit::gcra(ours.with_burst(burst).unwrap());
    let theirs = theirs.allow_burst(NonZeroU32::new(burst).unwrap());
    let admitted = match case.as_str() {
        "sd-direct" => {
            let l = MemoryLimiterBuilder::new(ours).direct().unwrap();
            measure(n, |_| l.check().unwrap().allowed)
        }
        "sd-direct-full" => {
            // Every field of the decision read, so none is optimised away.
            let l = MemoryLimiterBuilder::new(ours).direct().unwrap();
            measure(n, |_| {
                let d = l.check().unwrap();
                black_box((d.remaining, d.limit, d.retry_after, d.reset_after, d.delay));
                d.allowed
            })
        }
        "sd-allow" => {
            let l = MemoryLimiterBuilder::new(ours).direct().unwrap();
            measure(n, |_| l.allow())
        }
        "gov-direct" => {
            let l = governor::RateLimiter::direct(theirs);
            measure(n, |_| l.check().is_ok())
        }
        "sd-keyed" => {
            let l = MemoryLimiterBuilder::new(ours).keyed::<u64>().unwrap();
            for k in 0..KEYS {
                black_box(l.check(&k).unwrap());
            }
            measure(n, |i| l.check(&(i * 7 % KEYS)).unwrap().allowed)
        }
        "sd-keyed-allow" => {
            let l = MemoryLimiterBuilder::new(ours).keyed::<u64>().unwrap();
            for k in 0..KEYS {
                black_box(l.check(&k).unwrap());
            }
            measure(n, |i| l.allow(&(i * 7 % KEYS)))
        }
        "gov-keyed" => {
            let l = governor::RateLimiter::keyed(theirs);
            for k in 0..KEYS {
                black_box(l.check_key(&k).is_ok());
            }
            measure(n, |i| l.check_key(&(i * 7 % KEYS)).is_ok())
        }
        other => panic!("unknown case {other}"),
    };
    println!("{case} {n} admitted {admitted}");
}

/// The measured loop: `n` calls of `check(i)`, counting admissions.
#[inline(never)]
fn measure(n: u64, mut check: impl FnMut(u64) -> bool) -> u64 {
    let mut admitted = 0;
    for i in 0..n {
        admitted += u64::from(black_box(check(black_box(i))));
    }
    admitted
}
