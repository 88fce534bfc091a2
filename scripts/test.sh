#!/usr/bin/env bash
# The one test command (README): installs the servers the tests need, then runs every
# check, failing on the first error. Servers are started and stopped by the tests
# themselves (sd-testkit), each on a free port; this script verifies none is left over.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

step() { printf '\n==> %s\n' "$*"; }

# --- 1. Servers -------------------------------------------------------------------------
have() {
  command -v "$1" >/dev/null 2>&1 && return 0
  for dir in /usr/sbin /sbin /usr/local/sbin "${@:2}"; do
    [ -x "$dir/$1" ] && return 0
  done
  return 1
}
# Runs "$@" with a /usr/sbin/policy-rc.d that forbids starting services, then puts back
# whatever was there before (also when "$@" fails).
without_service_starts() {
  local policy=/usr/sbin/policy-rc.d saved="" rc=0
  if [ -e "$policy" ]; then
    saved=$(mktemp)
    cp -p "$policy" "$saved"
  fi
  printf '#!/bin/sh\n# scripts/test.sh: start no service while it installs packages\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  "$@" || rc=$?
  if [ -n "$saved" ]; then
    mv -f "$saved" "$policy"
  else
    rm -f "$policy"
  fi
  return "$rc"
}
pg_bins=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null || true)
missing=()
have redis-server || missing+=(redis-server)
have redis-cli || missing+=(redis-tools)
# shellcheck disable=SC2086
have postgres $pg_bins || missing+=(postgresql)
# shellcheck disable=SC2086
have psql $pg_bins || missing+=(postgresql-client)
have nats-server || missing+=(nats-server)
have etcd || missing+=(etcd-server)
# etcd-client (sd-lock's `etcd` feature) generates its gRPC code with protoc at build time.
have protoc || [ -n "${PROTOC:-}" ] || missing+=(protobuf-compiler)
# ...and its .proto files import google/protobuf/*.proto, which protoc alone lacks.
[ -f /usr/include/google/protobuf/descriptor.proto ] || [ -n "${PROTOC_INCLUDE:-}" ] ||
  missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Installing redis-server, postgresql, nats-server or etcd-server starts them as system
    # services; the tests start their own, so forbid that while installing: invoke-rc.d
    # starts nothing when /usr/sbin/policy-rc.d exits 101. One already there is kept aside
    # and put back afterwards.
    without_service_starts apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "error: the tests need these packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# Kafka in the tests is tansu, a Kafka-API broker built from crates.io (no Apache Kafka
# distribution is reachable); sd-testkit's `kafka` module says what it does and does not.
# It is built once per machine (about 12 minutes on two cores) into a cache outside the
# clone, which later runs, CI's included, reuse.
tansu_version=0.6.0
tools="${SD_TOOLS_DIR:-${HOME:-/root}/.cache/sd-tools}"
export SD_TANSU="${SD_TANSU:-$tools/tansu-$tansu_version/bin/tansu}"
if [ ! -x "$SD_TANSU" ]; then
  step "building tansu $tansu_version into $tools (once per machine)"
  CARGO_TARGET_DIR="$tools/tansu-build" CARGO_INCREMENTAL=0 \
    cargo install --locked tansu --version "$tansu_version" --features dynostore,libsql \
    --root "$tools/tansu-$tansu_version"
  rm -rf "$tools/tansu-build"
  export SD_TANSU="$tools/tansu-$tansu_version/bin/tansu"
fi

# Every server the tests start lives under this directory, so leftovers can be found. It
# is under /tmp, not the target dir: run as root, PostgreSQL runs as the `postgres` user,
# which cannot enter a target dir under /root (CI keeps its target dir in $HOME/.cache).
export SD_TESTKIT_DIR="${SD_TESTKIT_DIR:-${TMPDIR:-/tmp}/sd-testkit-$(id -u)}"
mkdir -p "$SD_TESTKIT_DIR"
# A server is found by its working directory, not its command line: Redis rewrites its
# title to `redis-server 127.0.0.1:PORT` and PostgreSQL's children show
# `postgres: checkpointer`, but every server runs in (Redis and PostgreSQL chdir into
# their data directory below) its own directory under $SD_TESTKIT_DIR, and so does every
# process it forks. A directory removed under a running server still matches: the link
# reads `DIR (deleted)`. Prints `pid command line` per process.
leftovers() {
  local root proc pid cwd
  root=$(readlink -f "$SD_TESTKIT_DIR")
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    [ "$pid" = "$$" ] && continue
    cwd=$(readlink "$proc/cwd" 2>/dev/null) || continue
    case "$cwd" in
      "$root" | "$root"/* | "$root (deleted)")
        printf '%s %s\n' "$pid" "$(tr -s '\0 ' ' ' <"$proc/cmdline" 2>/dev/null)"
        ;;
    esac
  done
}
cleanup() {
  local pids
  pids=$(leftovers | awk '{print $1}')
  # shellcheck disable=SC2086
  if [ -n "$pids" ]; then kill -9 $pids 2>/dev/null || true; fi
}
trap cleanup EXIT

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# One build per run: incremental caches would only fill the disk (tens of GB over the
# workspace's test binaries) without being reused.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

# --- 2. Format and lints ------------------------------------------------------------------
step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets --all-features -- -D warnings"
cargo clippy --workspace --all-targets --all-features -- -D warnings

# --- 3. Every crate with no features and with each feature alone --------------------------
# Features are read from each member's [features] table.
features_of() {
  awk '/^\[features\]/ {on=1; next} /^\[/ {on=0} on && /^[a-z0-9_-]+ *=/ {print $1}' "$1" |
    grep -v '^default$' || true
}
step "feature check: each crate with no features and with each feature alone"
for manifest in sd-*/Cargo.toml; do
  crate=$(dirname "$manifest")
  echo "   $crate (no features)"
  cargo check -q -p "$crate" --lib --no-default-features
  for feature in $(features_of "$manifest"); do
    echo "   $crate --features $feature"
    cargo check -q -p "$crate" --lib --no-default-features --features "$feature"
  done
done
# sd-examples has no library: its examples are what the features gate (required-features),
# so check them, with no features (the ungated ones) and with each feature alone.
echo "   sd-examples (no features)"
cargo check -q -p sd-examples --examples --no-default-features
for feature in $(features_of examples/Cargo.toml); do
  echo "   sd-examples --features $feature"
  cargo check -q -p sd-examples --examples --no-default-features --features "$feature"
done

# --- 3b. Docs build without warnings, with every feature and with none ------------------------
# (a link to an item behind a feature that is off is a warning, so both ends are checked)
step "cargo doc per crate, RUSTDOCFLAGS=-D warnings"
for manifest in sd-*/Cargo.toml; do
  crate=$(dirname "$manifest")
  echo "   $crate"
  RUSTDOCFLAGS="-D warnings" cargo doc -q -p "$crate" --no-deps --all-features
  RUSTDOCFLAGS="-D warnings" cargo doc -q -p "$crate" --no-deps --no-default-features
done

# --- 4. Tests, doc tests included -----------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
  step "cargo nextest run --workspace --all-features"
  cargo nextest run --workspace --all-features --no-fail-fast --failure-output final
  step "cargo test --workspace --all-features --doc"
  cargo test --workspace --all-features --doc
else
  step "cargo test --workspace --all-features (cargo-nextest not found)"
  cargo test --workspace --all-features --no-fail-fast
fi

# --- 5. The tour runs without any server ---------------------------------------------------
step "cargo run -p sd-examples --example tour"
cargo run -q -p sd-examples --example tour >/dev/null

# --- 6. Nothing the tests started is still running ---------------------------------------
step "checking that no test server is left running"
sleep 1
left=$(leftovers)
if [ -n "$left" ]; then
  echo "error: test servers are still running:" >&2
  echo "$left" >&2
  exit 1
fi
echo "all checks passed"
