//! `results`' unit tests: the sections it copies and the figures it renders.

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
fn the_interleaved_lines_are_taken_as_printed() {
    let output = "Benchmarking cache/hit/get/sd\ncache/hit interleaved (fastest of 20 rounds of 100k): get sd 220.1 ns moka 208.1 ns (1.06x)\nBenchmarking x\nratelimit/memory/metrics interleaved (fastest of 20 rounds of 100k): direct off 9.8 ns on 9.8 ns (1.002x)\npool/kafka_zero_work interleaved (medians of 10 alternating rounds): sd 1 s\n";
    let section = interleaved(output).unwrap();
    assert!(
        section.starts_with("\n## Interleaved rounds\n"),
        "{section}"
    );
    assert!(
        section.contains("```text\ncache/hit interleaved (fastest of 20 rounds of 100k): get sd 220.1 ns moka 208.1 ns (1.06x)\nratelimit/memory/metrics interleaved"),
        "{section}"
    );
    assert!(
        section.contains("(1.002x)\npool/kafka_zero_work interleaved (medians of"),
        "{section}"
    );
    assert!(!section.contains("Benchmarking"), "{section}");
    assert_eq!(interleaved("Benchmarking y\n"), None);
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
        text.contains("| sd-ratelimit | memory, one key | 20.0 ns | governor | 30.0 ns | 1.50× |"),
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
    let rated = dir.join("group").join("rated").join("new");
    fs::create_dir_all(&rated).unwrap();
    fs::write(
        rated.join("benchmark.json"),
        r#"{"full_id":"group/rated","throughput":{"Elements":100}}"#,
    )
    .unwrap();
    fs::write(
        rated.join("estimates.json"),
        r#"{"median":{"point_estimate":2000.0}}"#,
    )
    .unwrap();
    let medians = read_medians(&dir, UNIX_EPOCH).unwrap();
    let estimates = read_estimates(&dir, UNIX_EPOCH).unwrap();
    let later = SystemTime::now() + Duration::from_secs(60);
    let stale = read_medians(&dir, later).unwrap();
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(medians.get("group/bench"), Some(&42.5));
    assert_eq!(estimates["group/bench"].rate(), None);
    // 100 elements in 2 µs: 50 million a second.
    assert_eq!(estimates["group/rated"].rate(), Some(50_000_000.0));
    assert!(stale.is_empty(), "an estimate older than <since> was kept");
}

fn per_op(ns: f64) -> Estimate {
    Estimate {
        median: ns,
        elements: Some(1),
    }
}

#[test]
fn the_sizing_section_gives_rates_and_shards() {
    let estimates = BTreeMap::from([
        // 20 µs an operation: 50,000/s, 25,000/s usable.
        ("sizing/lock/sd".to_owned(), per_op(20_000.0)),
        ("sizing/lock/rslock".to_owned(), per_op(25_000.0)),
        ("sizing/lock/raw-set-nx-px".to_owned(), per_op(10_000.0)),
    ]);
    let text = render_sizing(&estimates, "cargo bench -p sd-benches --bench sizing");
    assert!(
        text.starts_with("\n## Sizing\n\nFrom `cargo bench -p sd-benches --bench sizing` ("),
        "{text}"
    );
    assert!(
        text.contains("| sd-lock | acquire + release, 64 callers, a resource each | 50,000/s | rslock | 40,000/s | 1.25× |"),
        "{text}"
    );
    assert!(
        text.contains("| SET NX PX + compare-and-delete | 100,000/s | 0.50× |"),
        "{text}"
    );
    // One arithmetic row per sd bench, though two peers share it.
    assert_eq!(
        text.matches("| 25,000/s | 1 | 4 | 40 |").count(),
        1,
        "{text}"
    );
    assert!(text.contains("Not measured in this run"), "{text}");
    assert!(text.contains("`sizing/pool/sd`"), "{text}");
}

#[test]
fn shards_round_up_and_never_reach_zero() {
    assert_eq!(shards_for(100_000.0, 50_000.0), 4);
    assert_eq!(shards_for(100_001.0, 50_000.0), 5);
    assert_eq!(shards_for(1.0, 50_000.0), 1);
}

#[test]
fn only_the_named_section_is_replaced() {
    let old = "# Bench results\n\n| a |\n\n## Sizing\n\nold figures\n\n## Cache stampede\n\nrows\n";
    let new = replace_section(old, SIZING_HEADING, "\n## Sizing\n\nnew figures\n");
    assert_eq!(
        new,
        "# Bench results\n\n| a |\n\n## Sizing\n\nnew figures\n\n## Cache stampede\n\nrows\n"
    );
    let last = "# Bench results\n\n## Sizing\n\nold\n";
    assert_eq!(
        replace_section(last, SIZING_HEADING, "\n## Sizing\n\nnew\n"),
        "# Bench results\n\n## Sizing\n\nnew\n"
    );
    let none = "# Bench results\n\n| a |\n";
    assert_eq!(
        replace_section(none, SIZING_HEADING, "\n## Sizing\n\nnew\n"),
        "# Bench results\n\n| a |\n\n## Sizing\n\nnew\n"
    );
}

#[test]
fn rates_read_to_three_digits() {
    assert_eq!(per_second(65_789.3), "65,800/s");
    assert_eq!(per_second(1_234_567.0), "1,230,000/s");
    assert_eq!(per_second(850.4), "850/s");
    assert_eq!(per_second(10_000.0), "10,000/s");
}
