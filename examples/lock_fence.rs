//! A fenced write: a holder pauses past its lease, another takes over, and the storage
//! refuses the first holder's late write because its fencing token is older.
//!
//! `cargo run -p sd-examples --example lock_fence` (memory; the same calls work on
//! `RedisLock`, `Redlock`, `PostgresLock` and `EtcdLock`, with `RedisFence` or
//! `PostgresFence` as the storage-side check).

use std::time::Duration;

use sd_lock::fence::FencedRegister;
use sd_lock::memory::MemoryLock;
use sd_lock::{Error, Lock};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let lock = MemoryLock::new();
    let balance = FencedRegister::new(100_i64);
    let ttl = Duration::from_millis(50);

    let a = lock.try_acquire("account:7", ttl).await?;
    let seen_by_a = balance.read(a.token())?;
    println!("A holds token {} and reads {seen_by_a}", a.token());

    tokio::time::sleep(ttl * 2).await; // A stalls: GC, page fault, network
    let b = lock.try_acquire("account:7", ttl).await?;
    let seen_by_b = balance.read(b.token())?;
    balance.write(b.token(), seen_by_b - 30)?;
    println!("B holds token {} and writes {}", b.token(), seen_by_b - 30);

    match balance.write(a.token(), seen_by_a - 50) {
        Err(Error::StaleToken { token, current }) => {
            println!("A's late write with token {token} is refused (the storage saw {current})");
        }
        other => return Err(format!("the stale write was not refused: {other:?}").into()),
    }
    println!("balance: {}", balance.peek());
    let _ = lock.release(b).await?;
    Ok(())
}
