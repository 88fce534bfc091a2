//! Shared inputs for the benches, so that sd and each peer crate see identical data.
#![forbid(unsafe_code)]

/// `n` distinct keys of the form `user:{i}:session`, deterministic across runs.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user:{i}:session")).collect()
}

/// The fastest time per call, in nanoseconds, of each of `reads` over `rounds` rounds of
/// `calls` calls, the reads alternating round by round, so each is timed in the same quiet
/// spells of a loaded machine (criterion times one after the other). A read gets the
/// call's index.
pub fn fastest_interleaved(rounds: usize, calls: usize, reads: &[&dyn Fn(usize)]) -> Vec<f64> {
    let mut best = vec![f64::MAX; reads.len()];
    for _ in 0..rounds {
        for (read, best) in reads.iter().zip(best.iter_mut()) {
            let start = std::time::Instant::now();
            for i in 0..calls {
                read(i);
            }
            *best = best.min(start.elapsed().as_secs_f64() * 1e9 / calls.max(1) as f64);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_distinct_and_stable() {
        let keys = super::keys(1000);
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), 1000);
        assert_eq!(keys[42], "user:42:session");
    }
}
