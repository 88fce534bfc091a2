#!/usr/bin/env bash
# Runs every criterion bench (each group runs an sd crate beside its peer on the same
# input), then writes benches/RESULTS.md: each sd figure beside the peer's figure from this
# same run, with the ratio, and the command, machine and date that produced them. The
# benches start their own servers through sd-testkit, like the tests; run scripts/test.sh
# once first so they are installed.
#
#   scripts/bench.sh                      # all benches, criterion's default timings
#   scripts/bench.sh --bench lock         # one bench file
#   scripts/bench.sh -- --measurement-time 2 --warm-up-time 1   # shorter runs
#
# Plain `cargo bench` at the root runs the same criterion benches (the workspace is
# virtual, so it takes every member; the others only add empty libtest bench harnesses),
# but writes no RESULTS.md, and criterion's options after `--` need `-p sd-benches`
# (those libtest harnesses refuse them): this script is the one command for figures.
#
# Figures depend on the machine and on what else it runs: the file records the load.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$(pwd)/target}"
export SD_TESTKIT_DIR="${SD_TESTKIT_DIR:-${TMPDIR:-/tmp}/sd-testkit-$(id -u)}"
# The lock bench writes its paired medians beside criterion's estimates.
export CRITERION_HOME="$target/criterion"

started=$(date +%s)
mkdir -p "$CRITERION_HOME"
# The benches' standard output is kept: scenario benches (the cache stampede) print their
# outcome there, and `results` copies it into RESULTS.md.
cargo bench -p sd-benches "$@" | tee "$CRITERION_HOME/bench-output.txt"
cargo run -q -p sd-benches --bin results -- "$target/criterion" benches/RESULTS.md "$started" \
    "scripts/bench.sh${*:+ $*}"
echo "wrote benches/RESULTS.md"
