//! Shared inputs for the benches, so that sd and each peer crate see identical data.
#![forbid(unsafe_code)]

/// `n` distinct keys of the form `user:{i}:session`, deterministic across runs.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user:{i}:session")).collect()
}

/// The fastest time per call, in nanoseconds, of each of `reads` over `rounds` rounds of
/// `calls` calls, the reads alternating round by round, so each is timed in the same quiet
/// spells of a loaded machine (criterion times one after the other). Each round starts
/// one read further on, so every read takes every place in the order equally often (what
/// ran just before a read, warming or evicting the caches it uses, moves its time by
/// several percent); give a multiple of the number of reads. A read gets the call's
/// index.
pub fn fastest_interleaved(rounds: usize, calls: usize, reads: &[&dyn Fn(usize)]) -> Vec<f64> {
    let mut best = vec![f64::MAX; reads.len()];
    for round in 0..rounds {
        for place in 0..reads.len() {
            let which = (round + place) % reads.len();
            let (Some(read), Some(best)) = (reads.get(which), best.get_mut(which)) else {
                continue;
            };
            let start = std::time::Instant::now();
            for i in 0..calls {
                read(i);
            }
            *best = best.min(start.elapsed().as_secs_f64() * 1e9 / calls.max(1) as f64);
        }
    }
    best
}

/// go-redis/redis_rate's GCRA, as its users deploy it (the peer of sd-ratelimit's Redis
/// rows in the `ratelimit` and `sizing` benches): one script over one key, time from the
/// server (`TIME`, seconds as a float from 2017 on), the theoretical arrival time kept as
/// a float and expiring when back to full. ARGV: burst, rate, period (s), cost. Returns
/// allowed (the cost or 0), remaining, retry after and reset after.
pub const REDIS_RATE_GCRA: &str = r#"
redis.replicate_commands()
local key = KEYS[1]
local burst, rate, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local interval = period / rate
local increment = interval * cost
local burst_offset = interval * burst
local t = redis.call('TIME')
local now = (t[1] - 1483228800) + (t[2] / 1000000)
local tat = tonumber(redis.call('GET', key) or now)
tat = math.max(tat, now)
local new_tat = tat + increment
local diff = now - (new_tat - burst_offset)
local remaining = diff / interval
if remaining < 0 then
  return {0, 0, tostring(-diff), tostring(tat - now)}
end
local reset_after = new_tat - now
if reset_after > 0 then
  redis.call('SET', key, new_tat, 'EX', math.ceil(reset_after))
end
return {cost, remaining, tostring(-1), tostring(reset_after)}
"#;

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
