//! Writes `benches/RESULTS.md` from criterion's output: each sd figure beside its peer's
//! figure from the same run, with the ratio, and the machine and date it was taken on.
//!
//! ```text
//! cargo run -p sd-benches --bin results -- <criterion dir> <output file> [<since> [<command>]]
//! ```
//!
//! `<since>` (seconds since the Unix epoch) drops every estimate written before it, so
//! figures from an earlier run never stand beside this run's. `<command>` is the command
//! that produced the figures, written in the file's header beside the machine.
//!
//! Besides criterion's estimates it reads the paired sd-lock medians
//! (`lock/paired/<backend>/{sd,rslock}`) the lock bench writes in criterion's layout: sd
//! and rslock in alternating 20-cycle blocks of one run, the side that goes first
//! swapped every round; and from the benches' standard output, which `scripts/bench.sh`
//! keeps as `<criterion dir>/bench-output.txt`, the cache stampede scenario's rows.
//!
//! `scripts/bench.sh` runs the benches and then this. The pairs are listed below by
//! criterion id (`group/function/parameter`); a pair whose benches did not run in this
//! run is listed as not measured, never filled from an older run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use std::{env, fs};

use serde_json::Value;

/// One row: our bench, the bench it is compared with, and what the comparison shows.
struct Pair {
    /// The crate (section of the table).
    krate: &'static str,
    /// What is measured, in words.
    what: &'static str,
    /// Criterion id of our bench.
    ours: &'static str,
    /// Criterion id of the peer or baseline bench.
    theirs: &'static str,
    /// Who the peer is.
    peer: &'static str,
}

const fn pair(
    krate: &'static str,
    what: &'static str,
    ours: &'static str,
    theirs: &'static str,
    peer: &'static str,
) -> Pair {
    Pair {
        krate,
        what,
        ours,
        theirs,
        peer,
    }
}

/// Every comparison the README and the issues quote.
#[rustfmt::skip]
const PAIRS: &[Pair] = &[
    pair("sd-hashring", "lookup, 10 nodes", "hashring/lookup/sd_ring_crc32/10", "hashring/lookup/hashring_crate/10", "hashring"),
    pair("sd-hashring", "lookup, 100 nodes", "hashring/lookup/sd_ring_crc32/100", "hashring/lookup/hashring_crate/100", "hashring"),
    pair("sd-hashring", "lookup, 1000 nodes", "hashring/lookup/sd_ring_crc32/1000", "hashring/lookup/hashring_crate/1000", "hashring"),
    pair("sd-hashring", "3 owners, 100 nodes", "hashring/owners3/sd_ring/100", "hashring/owners3/hashring_crate_walk/100", "hashring (distinct walk)"),
    pair("sd-hashring", "build, 10 nodes", "hashring_build/sd_ring/10", "hashring_build/hashring_crate/10", "hashring"),
    pair("sd-hashring", "build, 1000 nodes", "hashring_build/sd_ring/1000", "hashring_build/hashring_crate/1000", "hashring"),
    pair("sd-ratelimit", "memory, one key", "ratelimit/memory/direct/sd", "ratelimit/memory/direct/governor", "governor"),
    pair("sd-ratelimit", "memory, keyed, 1 thread", "ratelimit/memory/keyed/1-thread/sd", "ratelimit/memory/keyed/1-thread/governor", "governor"),
    pair("sd-ratelimit", "memory, keyed, 1 thread", "ratelimit/memory/keyed/1-thread/sd", "ratelimit/memory/keyed/1-thread/governor-foldhash", "governor (foldhash)"),
    pair("sd-ratelimit", "memory, keyed, 2 threads", "ratelimit/memory/keyed/2-thread/sd", "ratelimit/memory/keyed/2-thread/governor", "governor"),
    pair("sd-ratelimit", "memory, keyed, 2 threads", "ratelimit/memory/keyed/2-thread/sd", "ratelimit/memory/keyed/2-thread/governor-foldhash", "governor (foldhash)"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/redis-rate-gcra", "redis_rate GCRA script"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/envoy-fixed-window", "Envoy fixed window"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/raw-set", "raw SET"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/raw-evalsha-return-1", "raw EVALSHA"),
    pair("sd-cache", "memory hit", "cache/hit/get/sd", "cache/hit/get/moka", "moka get"),
    pair("sd-cache", "memory hit through the loader API", "cache/hit/get_or_load/sd", "cache/hit/get_with/moka", "moka get_with"),
    pair("sd-cache", "Redis hit", "cache/redis/get/sd", "cache/redis/GET/raw", "raw GET"),
    pair("sd-lock", "Redis, uncontended, paired blocks", "lock/paired/redis/sd", "lock/paired/redis/rslock", "rslock (alternating blocks)"),
    pair("sd-lock", "Redlock 3, uncontended, paired blocks", "lock/paired/redlock3/sd", "lock/paired/redlock3/rslock", "rslock (alternating blocks)"),
    pair("sd-lock", "Redlock 5, uncontended, paired blocks", "lock/paired/redlock5/sd", "lock/paired/redlock5/rslock", "rslock (alternating blocks)"),
    pair("sd-lock", "0.5 ms RTT: Redis, paired blocks", "lock/paired/rtt500us/redis/sd", "lock/paired/rtt500us/redis/rslock", "rslock (alternating blocks)"),
    pair("sd-lock", "0.5 ms RTT: Redlock 3, paired blocks", "lock/paired/rtt500us/redlock3/sd", "lock/paired/rtt500us/redlock3/rslock", "rslock (alternating blocks)"),
    pair("sd-lock", "0.5 ms RTT: Redlock 5, paired blocks", "lock/paired/rtt500us/redlock5/sd", "lock/paired/rtt500us/redlock5/rslock", "rslock (alternating blocks)"),
    pair("sd-lock", "Redis, uncontended", "lock/sd/redis/tasks=1", "lock/rslock/redis/tasks=1", "rslock"),
    pair("sd-lock", "Redis, 8 tasks", "lock/sd/redis/tasks=8", "lock/rslock/redis/tasks=8", "rslock"),
    pair("sd-lock", "Redlock 3, uncontended", "lock/sd/redlock3/tasks=1", "lock/rslock/redlock3/tasks=1", "rslock"),
    pair("sd-lock", "Redlock 5, uncontended", "lock/sd/redlock5/tasks=1", "lock/rslock/redlock5/tasks=1", "rslock"),
    pair("sd-lock", "Redlock 3 against one node", "lock/sd/redlock3/tasks=1", "lock/sd/redis/tasks=1", "sd single node"),
    pair("sd-lock", "Redlock 3 over one server's 3 databases against one node", "lock/sd/redlock3-one-server/tasks=1", "lock/sd/redis/tasks=1", "sd single node"),
    pair("sd-lock", "0.5 ms RTT: Redis, uncontended", "lock/rtt500us/sd/redis/tasks=1", "lock/rtt500us/rslock/redis/tasks=1", "rslock"),
    pair("sd-lock", "0.5 ms RTT: Redlock 3", "lock/rtt500us/sd/redlock3/tasks=1", "lock/rtt500us/rslock/redlock3/tasks=1", "rslock"),
    pair("sd-lock", "0.5 ms RTT: Redlock 5", "lock/rtt500us/sd/redlock5/tasks=1", "lock/rtt500us/rslock/redlock5/tasks=1", "rslock"),
    pair("sd-lock", "0.5 ms RTT: Redlock 3 against one node", "lock/rtt500us/sd/redlock3/tasks=1", "lock/rtt500us/sd/redis/tasks=1", "sd single node"),
    pair("sd-lock", "0.5 ms RTT: Redlock 5 against one node", "lock/rtt500us/sd/redlock5/tasks=1", "lock/rtt500us/sd/redis/tasks=1", "sd single node"),
    pair("sd-idempotency", "memory, first run", "idempotency/memory/first_run", "idempotency/bare/handler", "bare handler"),
    pair("sd-idempotency", "Redis, first run", "idempotency/redis/first_run", "idempotency/bare/handler", "bare handler"),
    pair("sd-idempotency", "PostgreSQL, first run", "idempotency/postgres/first_run", "idempotency/bare/handler", "bare handler"),
    pair("sd-pool", "100,000 tiny jobs", "pool/overhead/sd_pool", "pool/overhead/spawn_semaphore", "spawn + Semaphore"),
    pair("sd-pool", "100,000 tiny jobs", "pool/overhead/sd_pool", "pool/overhead/buffer_unordered", "buffer_unordered (one task)"),
    pair("sd-pool", "10,000 jobs of 0-5 ms, unordered", "pool/parallel_consumer/sd_pool_unordered", "pool/parallel_consumer/spawn_semaphore_unordered", "spawn + Semaphore"),
    pair("sd-pool", "10,000 jobs, per key over 1000 keys", "pool/parallel_consumer/sd_pool_per_key_1000", "pool/parallel_consumer/sd_pool_unordered", "sd unordered"),
    pair("sd-pool", "10,000 jobs, per key over 1000 keys", "pool/parallel_consumer/sd_pool_per_key_1000", "pool/parallel_consumer/ideal_per_key_1000", "ideal per key"),
    pair("sd-pool", "10,000 jobs, per key over 100 keys", "pool/parallel_consumer/sd_pool_per_key_100", "pool/parallel_consumer/sd_pool_unordered", "sd unordered"),
    pair("sd-pool", "10,000 jobs, per key over 100 keys", "pool/parallel_consumer/sd_pool_per_key_100", "pool/parallel_consumer/ideal_per_key_100", "ideal per key"),
    pair("sd-pool", "10,000 jobs, per key over 20 keys (busiest key: ~5x unordered by arithmetic)", "pool/parallel_consumer/sd_pool_per_key_20", "pool/parallel_consumer/sd_pool_unordered", "sd unordered"),
    pair("sd-pool", "10,000 jobs, per key over 20 keys", "pool/parallel_consumer/sd_pool_per_key_20", "pool/parallel_consumer/ideal_per_key_20", "ideal per key"),
    pair("sd-pool", "Kafka: 8,000 records of 1 ms jobs, 1,000 keys, 4 partitions, 64 workers, per key", "pool/kafka_1ms_jobs/sd_per_key_64", "pool/kafka_1ms_jobs/rdkafka_per_partition_task", "rdkafka, a task per partition"),
    pair("sd-pool", "Kafka: 8,000 records of 1 ms jobs, per key against unordered", "pool/kafka_1ms_jobs/sd_per_key_64", "pool/kafka_1ms_jobs/sd_unordered_64", "sd unordered"),
    pair("sd-pool", "Kafka: 20,000 zero-work records, per key, 64 workers", "pool/kafka_zero_work/sd_per_key_64", "pool/kafka_zero_work/rdkafka_bare_loop", "bare rdkafka poll loop"),
    pair("sd-saga", "5-step saga, no-op steps, memory log", "saga/noop_steps/memory_log", "saga/noop_steps/plain_sequence", "plain calls"),
    pair("sd-saga", "5-step saga, INSERT steps, memory log", "saga/insert_steps/memory_log", "saga/insert_steps/plain_sequence", "plain calls"),
    pair("sd-saga", "5-step saga, INSERT steps, PostgreSQL log", "saga/insert_steps/postgres_log", "saga/insert_steps/plain_sequence", "plain calls"),
    pair("sd-outbox", "enqueue in a transaction", "outbox/enqueue_tx/sd_enqueue", "outbox/enqueue_tx/bare_insert", "bare INSERT"),
    pair("sd-outbox", "relay to Redis Streams, batch 100, 1 relay", "outbox/relay_to_redis/sd/Parallel/1_relays/batch_100", "outbox/relay_to_redis/naive_poll/1_reader/batch_100", "naive poll by id"),
    pair("sd-outbox", "relay to Kafka (tansu), batch 100, 1 relay", "outbox/relay_to_kafka/sd/Parallel/1_relays/batch_100", "outbox/relay_to_redis/sd/Parallel/1_relays/batch_100", "sd relay to Redis Streams"),
];

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let (criterion, output, since, command) = match args.as_slice() {
        [criterion, output] => (criterion, output, UNIX_EPOCH, None),
        [criterion, output, since, command @ ..] if command.len() <= 1 => {
            match since.parse::<u64>() {
                Ok(secs) => (
                    criterion,
                    output,
                    UNIX_EPOCH + Duration::from_secs(secs),
                    command.first().map(String::as_str),
                ),
                Err(_) => {
                    eprintln!("<since> must be seconds since the Unix epoch, not {since:?}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => {
            eprintln!("usage: results <criterion dir> <output file> [<since> [<command>]]");
            return ExitCode::from(2);
        }
    };
    let medians = match read_medians(Path::new(criterion), since) {
        Ok(medians) => medians,
        Err(e) => {
            eprintln!("reading {criterion}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut text = render(
        &medians,
        command.unwrap_or("unknown (not given to `results`)"),
    );
    let output_of_run = Path::new(criterion).join(BENCH_OUTPUT);
    if let Some(stampede) = written_since(&output_of_run, since).and_then(|o| stampede(&o)) {
        text.push_str(&stampede);
    }
    if let Err(e) = fs::write(output, &text) {
        eprintln!("writing {output}: {e}");
        return ExitCode::FAILURE;
    }
    print!("{text}");
    ExitCode::SUCCESS
}

/// The benches' standard output, which `scripts/bench.sh` keeps beside criterion's
/// estimates: scenario benches (the cache stampede) print their outcome there.
const BENCH_OUTPUT: &str = "bench-output.txt";

/// The text of `path`, if it was written at or after `since`.
fn written_since(path: &Path, since: SystemTime) -> Option<String> {
    let written = fs::metadata(path).ok()?.modified().ok()?;
    (written >= since).then(|| fs::read_to_string(path).ok())?
}

/// The cache stampede section: the `cache/stampede:` header line the cache bench prints
/// and its indented rows (one per strategy), as printed, or `None` when the run has none.
fn stampede(output: &str) -> Option<String> {
    let mut lines = output
        .lines()
        .skip_while(|l| !l.starts_with("cache/stampede:"));
    let header = lines.next()?;
    let rows: Vec<&str> = lines.take_while(|l| l.starts_with("  ")).collect();
    if rows.is_empty() {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Cache stampede\n\nFrom the same run (`benches/benches/cache.rs`, the scenario \
         of `examples/stampede`): {}. One row per strategy on the same scenario: loader calls \
         over the whole run (one per expiry is the floor) and the latency of reads.\n",
        header.trim_start_matches("cache/stampede:").trim()
    );
    let _ = writeln!(out, "```text");
    for row in rows {
        let _ = writeln!(out, "{}", row.trim_start());
    }
    let _ = writeln!(out, "```");
    Some(out)
}

/// Median time per iteration in nanoseconds, by criterion id, for every bench criterion
/// holds a `new` estimate of written at or after `since`.
fn read_medians(dir: &Path, since: SystemTime) -> Result<BTreeMap<String, f64>, String> {
    let mut found = BTreeMap::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                if let Some((id, median)) = read_estimate(&path, since) {
                    found.insert(id, median);
                }
            } else if path.file_name().is_none_or(|n| n != "report") {
                stack.push(path);
            }
        }
    }
    Ok(found)
}

fn read_estimate(new: &Path, since: SystemTime) -> Option<(String, f64)> {
    let written = fs::metadata(new.join("estimates.json"))
        .ok()?
        .modified()
        .ok()?;
    if written < since {
        return None;
    }
    let bench: Value =
        serde_json::from_str(&fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let estimates: Value =
        serde_json::from_str(&fs::read_to_string(new.join("estimates.json")).ok()?).ok()?;
    let id = bench.get("full_id")?.as_str()?.to_owned();
    let median = estimates.get("median")?.get("point_estimate")?.as_f64()?;
    Some((id, median))
}

fn render(medians: &BTreeMap<String, f64>, command: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Bench results\n");
    let _ = writeln!(
        out,
        "Written by `scripts/bench.sh` from one criterion run: every figure in a row comes \
         from the same run on the same machine. Figures are medians per operation; the \
         ratio is the peer's time over ours, so above 1 means sd is faster.\n"
    );
    let _ = writeln!(
        out,
        "- date: {}",
        shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(out, "- command: `{command}`");
    let _ = writeln!(out, "- machine: {}", machine());
    let _ = writeln!(out, "- load average at the end: {}", load_average());
    let _ = writeln!(out, "- rustc: {}\n", shell("rustc", &["--version"]));
    let _ = writeln!(out, "| crate | what | sd | peer | peer's figure | ratio |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut missing = Vec::new();
    for p in PAIRS {
        match (medians.get(p.ours), medians.get(p.theirs)) {
            (Some(&ours), Some(&theirs)) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {:.2}× |",
                    p.krate,
                    p.what,
                    human(ours),
                    p.peer,
                    human(theirs),
                    theirs / ours
                );
            }
            _ => missing.push(p),
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(out, "\nNot measured in this run:\n");
        for p in missing {
            let _ = writeln!(
                out,
                "- {} {}: `{}` against `{}`",
                p.krate, p.what, p.ours, p.theirs
            );
        }
    }
    out
}

/// A duration in nanoseconds, in the unit that reads best.
fn human(ns: f64) -> String {
    match ns {
        ns if ns < 1e3 => format!("{ns:.1} ns"),
        ns if ns < 1e6 => format!("{:.1} µs", ns / 1e3),
        ns if ns < 1e9 => format!("{:.1} ms", ns / 1e6),
        ns => format!("{:.2} s", ns / 1e9),
    }
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cpu}, {cores} cores, {}", shell("uname", &["-sr"]))
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn shell(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stampede_rows_are_taken_as_printed() {
        let output = "Compiling x\ncache/stampede: 1000 readers, loader 50ms\n  naive (moka)   loader calls  2001\n  sd-cache       loader calls     3\nBenchmarking cache/hit/get/sd\n";
        let section = stampede(output).unwrap();
        assert!(section.contains("1000 readers, loader 50ms"), "{section}");
        assert!(
            section.contains(
                "\nnaive (moka)   loader calls  2001\nsd-cache       loader calls     3\n```"
            ),
            "{section}"
        );
        assert!(!section.contains("Benchmarking"), "{section}");
        assert_eq!(stampede("cache/stampede: x\nBenchmarking y\n"), None);
        assert_eq!(stampede("nothing"), None);
    }

    #[test]
    fn durations_read_in_their_unit() {
        assert_eq!(human(36.64), "36.6 ns");
        assert_eq!(human(147_000.0), "147.0 µs");
        assert_eq!(human(2_500_000.0), "2.5 ms");
        assert_eq!(human(1.25e9), "1.25 s");
    }

    #[test]
    fn a_pair_from_this_run_gets_a_ratio_and_a_missing_one_is_named() {
        let medians = BTreeMap::from([
            ("ratelimit/memory/direct/sd".to_owned(), 20.0),
            ("ratelimit/memory/direct/governor".to_owned(), 30.0),
        ]);
        let text = render(&medians, "scripts/bench.sh --bench ratelimit");
        assert!(
            text.contains("- command: `scripts/bench.sh --bench ratelimit`"),
            "{text}"
        );
        assert!(
            text.contains(
                "| sd-ratelimit | memory, one key | 20.0 ns | governor | 30.0 ns | 1.50× |"
            ),
            "{text}"
        );
        assert!(text.contains("Not measured in this run"), "{text}");
        assert!(text.contains("`lock/sd/redis/tasks=1`"), "{text}");
    }

    #[test]
    fn the_paired_lock_medians_get_their_row() {
        let medians = BTreeMap::from([
            ("lock/paired/redis/sd".to_owned(), 100_000.0),
            ("lock/paired/redis/rslock".to_owned(), 150_000.0),
        ]);
        let text = render(&medians, "cargo bench");
        assert!(
            text.contains(
                "| sd-lock | Redis, uncontended, paired blocks | 100.0 µs | rslock (alternating blocks) | 150.0 µs | 1.50× |"
            ),
            "{text}"
        );
    }

    #[test]
    fn estimates_are_read_from_criterion_files() {
        let dir = env::temp_dir().join(format!("sd-results-{}", std::process::id()));
        let new = dir.join("group").join("bench").join("new");
        fs::create_dir_all(&new).unwrap();
        fs::write(new.join("benchmark.json"), r#"{"full_id":"group/bench"}"#).unwrap();
        fs::write(
            new.join("estimates.json"),
            r#"{"median":{"point_estimate":42.5}}"#,
        )
        .unwrap();
        let medians = read_medians(&dir, UNIX_EPOCH).unwrap();
        let later = SystemTime::now() + Duration::from_secs(60);
        let stale = read_medians(&dir, later).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(medians.get("group/bench"), Some(&42.5));
        assert!(stale.is_empty(), "an estimate older than <since> was kept");
    }
}
