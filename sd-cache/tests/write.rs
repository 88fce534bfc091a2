//! Write-through and write-behind against an in-memory store that can fail on demand.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_cache::write::WriteBehindStats;
use sd_cache::{Cache, DeadLetter, Error, Store, WriteBehind, WriteOp, WriteThrough};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
#[error("store unavailable")]
struct Unavailable;

/// A table that fails its first `fail_first` batches (`usize::MAX`: always), counts what
/// it receives, and can be held closed with a semaphore.
#[derive(Clone, Default)]
struct Table {
    rows: Arc<Mutex<HashMap<u32, u64>>>,
    key_writes: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    fail_first: usize,
    gate: Option<Arc<Semaphore>>,
}

impl Table {
    fn failing(n: usize) -> Self {
        Self {
            fail_first: n,
            ..Self::default()
        }
    }

    fn row(&self, k: u32) -> Option<u64> {
        self.rows.lock().unwrap().get(&k).copied()
    }
}

impl Store<u32, u64> for Table {
    type Error = Unavailable;

    async fn write(&self, key: &u32, op: &WriteOp<u64>) -> Result<(), Unavailable> {
        self.write_batch(&[(*key, op.clone())]).await
    }

    async fn write_batch(&self, batch: &[(u32, WriteOp<u64>)]) -> Result<(), Unavailable> {
        if let Some(gate) = &self.gate {
            let _ = gate.acquire().await.unwrap();
        }
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err(Unavailable);
        }
        let mut rows = self.rows.lock().unwrap();
        for (k, op) in batch {
            match op {
                WriteOp::Put(v) => rows.insert(*k, *v),
                WriteOp::Delete => rows.remove(k),
            };
        }
        self.key_writes.fetch_add(batch.len(), Ordering::SeqCst);
        Ok(())
    }
}

fn cache() -> Cache<u32, u64> {
    Cache::builder().build().unwrap()
}

/// A write-behind with the default settings over a fresh cache, storing into `table`.
fn write_behind(table: &Table) -> WriteBehind<u32, u64, Cache<u32, u64>> {
    WriteBehind::builder()
        .build(cache(), table.clone())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_writes_then_shutdown_all_reach_the_store_coalesced() {
    let table = Table::default();
    let wb = write_behind(&table);
    // 40 hot keys (below the batch size of 50): only the interval or shutdown flushes.
    for i in 0..10_000u64 {
        wb.write((i % 40) as u32, i).await.unwrap();
    }
    assert_eq!(wb.cache().get(&7), Some(9_967), "cached at once");
    let stats = wb.shutdown().await.unwrap();
    for k in 0..40u32 {
        assert_eq!(
            table.row(k),
            Some(9_960 + u64::from(k)),
            "key {k}: last write"
        );
    }
    assert_eq!(stats.accepted, 10_000);
    assert_eq!(stats.written + stats.coalesced, 10_000, "{stats:?}");
    let stored = table.key_writes.load(Ordering::SeqCst);
    assert_eq!(stored, 40, "one store write per key: {stats:?}");
    assert_eq!(stats.dead_lettered, 0);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_fails_twice_then_recovers_gets_every_write() {
    let table = Table::failing(2);
    let wb = write_behind(&table);
    for k in 0..30u32 {
        wb.write(k, u64::from(k)).await.unwrap();
    }
    let stats = wb.shutdown().await.unwrap();
    assert_eq!(stats.retries, 2, "{stats:?}");
    assert_eq!(stats.written, 30);
    assert_eq!(stats.dead_lettered, 0);
    assert!((0..30u32).all(|k| table.row(k) == Some(u64::from(k))));
}

#[tokio::test(start_paused = true)]
async fn a_store_that_always_fails_sends_every_write_to_the_dead_letter_hook() {
    let table = Table::failing(usize::MAX);
    let letters: Arc<Mutex<Vec<DeadLetter<u32, u64>>>> = Arc::default();
    let sink = letters.clone();
    let wb = WriteBehind::builder()
        .retry(
            sd_cache::RetryPolicy::builder()
                .initial_interval(Duration::from_millis(100))
                .max_attempts(3)
                .jitter(0.0)
                .build()
                .unwrap(),
        )
        .dead_letter(move |letter| sink.lock().unwrap().push(letter))
        .build(cache(), table.clone())
        .unwrap();
    for k in 0..120u32 {
        wb.write(k, 1).await.unwrap();
    }
    wb.delete(500).await.unwrap();
    let stats: WriteBehindStats = wb.shutdown().await.unwrap();
    let letters = letters.lock().unwrap();
    let mut keys: Vec<u32> = letters
        .iter()
        .flat_map(|l| l.writes.iter().map(|w| w.0))
        .collect();
    keys.sort_unstable();
    let expected: Vec<u32> = (0..120).chain([500]).collect();
    assert_eq!(keys, expected, "every accepted write, once");
    assert!(
        letters
            .iter()
            .all(|l| l.attempts == 3 && l.error.to_string() == "store unavailable")
    );
    assert_eq!(stats.dead_lettered, 121);
    assert_eq!(stats.written, 0);
}

#[tokio::test(start_paused = true)]
async fn the_interval_flushes_a_small_batch_without_shutdown() {
    let table = Table::default();
    let wb = write_behind(&table);
    wb.write(1, 10).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(
        table.row(1),
        None,
        "below the batch size: waits for the interval"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(table.row(1), Some(10));
    wb.write(2, 20).await.unwrap();
    wb.flush().await.unwrap();
    assert_eq!(
        table.row(2),
        Some(20),
        "flush() returns once the store has it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_buffer_applies_backpressure() {
    let gate = Arc::new(Semaphore::new(0));
    let table = Table {
        gate: Some(gate.clone()),
        ..Table::default()
    };
    let wb = Arc::new(
        WriteBehind::builder()
            .capacity(4)
            .batch_size(1)
            .build(cache(), table.clone())
            .unwrap(),
    );
    // The worker takes the first write and blocks in the store; four more fill the buffer.
    wb.write(0, 0).await.unwrap();
    tokio::task::yield_now().await;
    for k in 1..=4 {
        wb.try_write(k, 0).await.unwrap();
    }
    assert!(matches!(
        wb.try_write(9, 9).await,
        Err(Error::Full { capacity: 4 })
    ));
    assert_eq!(
        wb.cache().get(&9),
        None,
        "a refused write does not reach the cache"
    );
    let blocked = {
        let wb = wb.clone();
        tokio::spawn(async move { wb.write(5, 5).await })
    };
    tokio::task::yield_now().await;
    assert!(!blocked.is_finished(), "write() waits for room");
    gate.add_permits(100);
    blocked.await.unwrap().unwrap();
    let wb = Arc::into_inner(wb).unwrap();
    let stats = wb.shutdown().await.unwrap();
    assert_eq!(stats.written, 6);
    assert!(matches!(
        WriteBehind::<u32, u64, ()>::builder()
            .batch_size(0)
            .build(cache(), Table::default()),
        Err(Error::InvalidConfig {
            field: "batch_size",
            ..
        })
    ));
}

#[tokio::test]
async fn write_through_stores_first_and_a_failed_store_leaves_no_new_value() {
    let ok = WriteThrough::new(cache(), Table::default());
    ok.write(1, 10).await.unwrap();
    assert_eq!(ok.cache().get(&1), Some(10));
    assert_eq!(ok.store().row(1), Some(10));
    ok.delete(1).await.unwrap();
    assert_eq!((ok.cache().get(&1), ok.store().row(1)), (None, None));

    let failing = WriteThrough::new(cache(), Table::failing(usize::MAX));
    failing.cache().insert(1, 5);
    let err = failing.write(1, 10).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    assert_eq!(
        failing.cache().get(&1),
        None,
        "neither the new value nor the possibly stale old one"
    );
}
