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
//!
//! The Sizing section (the `sizing` bench: operations a second on one Redis server, and
//! the shards a load needs) is written after the table. To run that bench alone and
//! rewrite only its section, leaving the rest of the file as it is:
//!
//! ```text
//! since=$(date +%s)
//! CRITERION_HOME="$PWD/target/criterion" cargo bench -p sd-benches --bench sizing
//! cargo run -p sd-benches --bin results -- --sizing target/criterion benches/RESULTS.md "$since" \
//!     "cargo bench -p sd-benches --bench sizing"
//! ```

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
    pair("sd-ratelimit", "memory, one key, feature metrics with a recorder installed", "ratelimit/memory/metrics/direct/on", "ratelimit/memory/metrics/direct/off", "the same, no recorder"),
    pair("sd-ratelimit", "memory, keyed, 1 thread, feature metrics with a recorder installed", "ratelimit/memory/metrics/keyed/1-thread/on", "ratelimit/memory/metrics/keyed/1-thread/off", "the same, no recorder"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/redis-rate-gcra", "redis_rate GCRA script"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/envoy-fixed-window", "Envoy fixed window"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/raw-set", "raw SET"),
    pair("sd-ratelimit", "Redis, 64 callers", "ratelimit/redis-64-callers/sd-check", "ratelimit/redis-64-callers/raw-evalsha-return-1", "raw EVALSHA"),
    pair("sd-cache", "memory hit", "cache/hit/get/sd", "cache/hit/get/moka", "moka get"),
    pair("sd-cache", "memory hit through the loader API", "cache/hit/get_or_load/sd", "cache/hit/get_with/moka", "moka get_with"),
    pair("sd-cache", "Redis hit", "cache/redis/get/sd", "cache/redis/GET/raw", "raw GET"),
    pair("sd-cache", "two-tier memory hit (`String` keys)", "cache/two-tier/get/sd-two-tier", "cache/two-tier/get/moka", "moka get"),
    pair("sd-cache", "two-tier memory hit through the loader API", "cache/two-tier/get_or_load/sd-two-tier", "cache/two-tier/get_with/moka", "moka entry_by_ref or_insert_with"),
    pair("sd-cache", "memory hit, feature metrics with a recorder installed", "cache/hit/metrics/get/on", "cache/hit/metrics/get/off", "the same, no recorder"),
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

/// One row of the Sizing section: an operation of an sd crate on one Redis server beside
/// the same work done by the peer, both from the `sizing` bench.
struct Sizing {
    /// The crate.
    krate: &'static str,
    /// What one operation is, and how many callers run them at once.
    what: &'static str,
    /// Criterion id of our bench.
    ours: &'static str,
    /// Criterion id of the peer's bench.
    theirs: &'static str,
    /// Who the peer is.
    peer: &'static str,
}

const fn sizing(
    krate: &'static str,
    what: &'static str,
    ours: &'static str,
    theirs: &'static str,
    peer: &'static str,
) -> Sizing {
    Sizing {
        krate,
        what,
        ours,
        theirs,
        peer,
    }
}

/// The operations each Redis-backed crate is sized by.
#[rustfmt::skip]
const SIZING: &[Sizing] = &[
    sizing("sd-ratelimit", "decisions, 64 callers", "sizing/ratelimit/sd", "sizing/ratelimit/redis-rate-gcra", "redis_rate GCRA script"),
    sizing("sd-ratelimit", "decisions, 64 callers, `batch(64)`", "sizing/ratelimit/sd-batched", "sizing/ratelimit/redis-rate-gcra", "redis_rate GCRA script"),
    sizing("sd-cache", "Redis hits, 64 callers", "sizing/cache/hit/sd", "sizing/cache/hit/raw-get", "raw GET"),
    sizing("sd-cache", "loads (miss, load, store), 64 callers", "sizing/cache/load/sd", "sizing/cache/load/raw-get-set", "GET + SET PX"),
    sizing("sd-lock", "acquire + release, 64 callers, a resource each", "sizing/lock/sd", "sizing/lock/rslock", "rslock"),
    sizing("sd-lock", "acquire + release, 64 callers, a resource each", "sizing/lock/sd", "sizing/lock/raw-set-nx-px", "SET NX PX + compare-and-delete"),
    sizing("sd-idempotency", "claim + complete, 64 callers, new keys", "sizing/idempotency/sd", "sizing/idempotency/raw-set-nx-then-set-xx", "SET NX PX + SET XX PX"),
    sizing("sd-outbox", "events published, 8 batches of 100 in flight, one stream", "sizing/outbox/sd", "sizing/outbox/raw-xadd-pipeline", "raw XADD pipeline"),
    sizing("sd-pool", "stream entries handled (no work), one consumer, batch 100, 64 workers", "sizing/pool/sd", "sizing/pool/raw-xreadgroup-xack", "XREADGROUP + XACK loop"),
];

/// The share of a shard's measured rate a deployment should plan to use.
const HEADROOM: f64 = 0.5;

/// Loads the Sizing section works out, in operations a second.
const EXAMPLE_LOADS: [f64; 3] = [10_000.0, 100_000.0, 1_000_000.0];

fn main() -> ExitCode {
    let mut args: Vec<String> = env::args().skip(1).collect();
    let sizing_only = args.first().is_some_and(|a| a == "--sizing");
    if sizing_only {
        args.remove(0);
    }
    let (criterion, output, since, command) = match args.as_slice() {
        [criterion, output] if !sizing_only => (criterion, output, UNIX_EPOCH, None),
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
            eprintln!(
                "usage: results <criterion dir> <output file> [<since> [<command>]]\n       \
                 results --sizing <criterion dir> <output file> <since> [<command>]"
            );
            return ExitCode::from(2);
        }
    };
    let estimates = match read_estimates(Path::new(criterion), since) {
        Ok(estimates) => estimates,
        Err(e) => {
            eprintln!("reading {criterion}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let command = command.unwrap_or("unknown (not given to `results`)");
    let text = if sizing_only {
        let old = match fs::read_to_string(output) {
            Ok(old) => old,
            Err(e) => {
                eprintln!("reading {output}: {e}");
                return ExitCode::FAILURE;
            }
        };
        replace_section(&old, SIZING_HEADING, &render_sizing(&estimates, command))
    } else {
        let medians = estimates
            .iter()
            .map(|(id, e)| (id.clone(), e.median))
            .collect();
        let mut text = render(&medians, command);
        let output_of_run = Path::new(criterion).join(BENCH_OUTPUT);
        let output_text = written_since(&output_of_run, since);
        if let Some(stampede) = output_text.as_deref().and_then(stampede) {
            text.push_str(&stampede);
        }
        if let Some(rounds) = output_text.as_deref().and_then(interleaved) {
            text.push_str(&rounds);
        }
        text.push_str(&render_sizing(&estimates, command));
        text
    };
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

/// The interleaved section: every line a bench printed of its reads timed in alternating
/// rounds (`... interleaved (fastest of N rounds ...): ...`, `... interleaved (medians of
/// ...`), as printed, or `None` when the run has none.
fn interleaved(output: &str) -> Option<String> {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| {
            l.contains(" interleaved (fastest of ") || l.contains(" interleaved (medians of ")
        })
        .collect();
    if lines.is_empty() {
        return None;
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Interleaved rounds\n\nFrom the same run: the hottest paths timed again in \
         alternating rounds, each round starting one read further on, keeping each read's \
         fastest round (the Kafka rounds, whole topics whose time is mostly the broker's, keep \
         the median). Criterion times one bench after another, so a busy spell that falls \
         on one side moves a ratio of nanosecond figures by tens of percent; here both sides \
         meet the same spells. Where a row above and a line here disagree, this is the \
         figure to trust.\n"
    );
    let _ = writeln!(out, "```text");
    for line in lines {
        let _ = writeln!(out, "{}", line.trim());
    }
    let _ = writeln!(out, "```");
    Some(out)
}

/// What `results` takes from one criterion bench: the median time per iteration in
/// nanoseconds, and the elements one iteration handles when the bench declared them
/// (`Throughput::Elements`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Estimate {
    median: f64,
    elements: Option<u64>,
}

impl Estimate {
    /// Elements per second at the median, for a bench that declared its elements.
    fn rate(&self) -> Option<f64> {
        self.elements.map(|n| n as f64 * 1e9 / self.median)
    }
}

/// Median time per iteration in nanoseconds, by criterion id, for every bench criterion
/// holds a `new` estimate of written at or after `since`.
#[cfg(test)]
fn read_medians(dir: &Path, since: SystemTime) -> Result<BTreeMap<String, f64>, String> {
    Ok(read_estimates(dir, since)?
        .into_iter()
        .map(|(id, e)| (id, e.median))
        .collect())
}

/// The [`Estimate`] of every bench criterion holds a `new` estimate of written at or
/// after `since`, by criterion id.
fn read_estimates(dir: &Path, since: SystemTime) -> Result<BTreeMap<String, Estimate>, String> {
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
                if let Some((id, estimate)) = read_estimate(&path, since) {
                    found.insert(id, estimate);
                }
            } else if path.file_name().is_none_or(|n| n != "report") {
                stack.push(path);
            }
        }
    }
    Ok(found)
}

fn read_estimate(new: &Path, since: SystemTime) -> Option<(String, Estimate)> {
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
    let elements = bench
        .get("throughput")
        .and_then(|t| t.get("Elements"))
        .and_then(Value::as_u64);
    Some((id, Estimate { median, elements }))
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

/// The heading of the Sizing section, which `--sizing` replaces alone.
const SIZING_HEADING: &str = "## Sizing";

/// The Sizing section: each [`SIZING`] row in operations a second on one shard, then the
/// shards [`EXAMPLE_LOADS`] need at [`HEADROOM`], and what does not spread over shards.
fn render_sizing(estimates: &BTreeMap<String, Estimate>, command: &str) -> String {
    let rate = |id: &str| estimates.get(id).and_then(Estimate::rate);
    let mut out = String::new();
    let _ = writeln!(out, "\n{SIZING_HEADING}\n");
    let _ = writeln!(
        out,
        "From `{command}` ({}; load average at the end: {}), `benches/benches/sizing.rs`: one \
         `redis-server` without persistence (one shard) on the machine above, sharing its two \
         cores with the bench client. Each row is what that shard sustained for one operation \
         of the crate, beside the peer doing the same work on the same server, connection and \
         callers (each sample of one runs a block of the other too, in turns, so both meet \
         the same load): operations a second at criterion's median; the ratio is ours over \
         the peer's, so above 1 means sd does more.\n",
        shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        load_average()
    );
    let _ = writeln!(
        out,
        "| crate | operation, callers | sd per shard | peer | peer per shard | ratio |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut missing = Vec::new();
    for row in SIZING {
        match (rate(row.ours), rate(row.theirs)) {
            (Some(ours), Some(theirs)) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {:.2}× |",
                    row.krate,
                    row.what,
                    per_second(ours),
                    row.peer,
                    per_second(theirs),
                    ours / theirs
                );
            }
            _ => missing.push(row),
        }
    }
    let _ = writeln!(
        out,
        "\nShards for a load: `shards = ceil(load / (rate × {HEADROOM}))`, `rate` being sd's \
         figure above. The headroom of {HEADROOM} is for this machine, where client and server \
         share two cores, and for what a shard run at its ceiling has no room left for: \
         bursts, a failover's catch-up, a replica's full sync. Worked for three loads:\n"
    );
    let loads: Vec<String> = EXAMPLE_LOADS.iter().map(|&l| per_second(l)).collect();
    let _ = writeln!(
        out,
        "| crate | operation | usable per shard | {} |",
        loads.join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|{}", "---|".repeat(loads.len()));
    let mut seen = Vec::new();
    for row in SIZING {
        let Some(ours) = rate(row.ours) else { continue };
        if seen.contains(&row.ours) {
            continue;
        }
        seen.push(row.ours);
        let usable = ours * HEADROOM;
        let shards: Vec<String> = EXAMPLE_LOADS
            .iter()
            .map(|&load| shards_for(load, ours).to_string())
            .collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.krate,
            row.what,
            per_second(usable),
            shards.join(" | ")
        );
    }
    let _ = writeln!(
        out,
        "\nWhat more shards do not spread: every operation on one key goes to the shard holding \
         its slot, so one hot key (a limit, a cache entry, a lock, an idempotency key) is held \
         to one shard's rate; a stream, its consumer group and its dead-letter stream share one \
         hash tag, so one stream's events and entries are too (more aggregate types, so more \
         streams, spread); Redlock writes each lease to all of its N masters, so N masters \
         sustain what one does. The client here is on loopback: across a network each round \
         trip is longer, and it takes more callers in flight to reach these rates."
    );
    if !missing.is_empty() {
        let _ = writeln!(out, "\nNot measured in this run:\n");
        for row in missing {
            let _ = writeln!(
                out,
                "- {} {} against {}: `{}` against `{}`",
                row.krate, row.what, row.peer, row.ours, row.theirs
            );
        }
    }
    out
}

/// Shards a `load` needs when one sustains `rate`, used at [`HEADROOM`]; at least one.
fn shards_for(load: f64, rate: f64) -> u64 {
    (load / (rate * HEADROOM)).ceil().max(1.0) as u64
}

/// `old` with the section under `heading` (up to the next `## ` heading, or the end)
/// replaced by `section`, or with `section` added at the end when it has none.
fn replace_section(old: &str, heading: &str, section: &str) -> String {
    let Some(start) = old.find(&format!("\n{heading}\n")) else {
        let mut text = old.to_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(section);
        return text;
    };
    let body = start + 1 + heading.len();
    let end = old[body..].find("\n## ").map_or(old.len(), |i| body + i);
    format!("{}{section}{}", &old[..start], &old[end..])
}

/// A rate to three significant digits, with thousands separated: `65,800/s`.
fn per_second(rate: f64) -> String {
    let magnitude = rate.max(1.0).log10().floor() as i32;
    let step = 10f64.powi((magnitude - 2).max(0));
    let rounded = ((rate / step).round() * step) as u64;
    let digits = rounded.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out.push_str("/s");
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
#[path = "results/tests.rs"]
mod tests;
