//! The tour's sd-outbox scenario: events in the order's transaction, relayed in order,
//! a rolled-back transaction publishing nothing, and (on memory) a dead letter redriven.

use std::time::Duration;

use super::{Backends, expect, fail};

/// sd-outbox: events written in the transaction of the order they belong to, relayed in
/// order per order; a rolled-back transaction publishes nothing. On memory the
/// transaction is a `MemoryOutbox` unit of work; with `--postgres`, an sqlx transaction.
pub(crate) async fn outbox(backends: &Backends) {
    let on = if backends.postgres.is_some() {
        "PostgreSQL"
    } else {
        "memory"
    };
    println!(
        "\n== sd-outbox: 9 events of 3 orders in 9 transactions and 1 rolled back, on {on} =="
    );
    let run = &backends.run;
    let orders = ["order-1", "order-2", "order-3"].map(|o| format!("{o}-{run}"));
    let ghost = format!("order-4-{run}");
    let relayed = match &backends.postgres {
        Some(pool) => outbox_postgres(pool, &orders, &ghost).await,
        None => outbox_memory(&orders, &ghost).await,
    };
    let events = match relayed {
        Ok(events) => events,
        Err(e) => return fail(format!("failed: {e}")),
    };
    let events: Vec<_> = events
        .into_iter()
        .filter(|e| e.aggregate_id.ends_with(run.as_str()))
        .collect();
    println!(
        "  relayed {} events to the memory sink; per order, in the order received:",
        events.len()
    );
    for order in orders.iter().chain([&ghost]) {
        let types: Vec<&str> = events
            .iter()
            .filter(|e| &e.aggregate_id == order)
            .map(|e| e.event_type.as_str())
            .collect();
        let name = order.trim_end_matches(run.as_str()).trim_end_matches('-');
        let want: &[&str] = if order == &ghost {
            &[]
        } else {
            &["created", "paid", "shipped"]
        };
        expect(
            types == want,
            "each order's events once, in order; none rolled back",
        );
        let note = if order == &ghost {
            " (its transaction rolled back)"
        } else {
            ""
        };
        println!(
            "    {name}: {}{note}",
            if types.is_empty() {
                "nothing".to_owned()
            } else {
                types.join(" -> ")
            }
        );
    }
    if backends.postgres.is_none()
        && let Err(e) = outbox_memory_dead_letter(&orders[0]).await
    {
        fail(format!("failed: {e}"));
    }
}

/// The message of `order`'s `step`.
fn order_event(order: &str, step: &str) -> sd_outbox::Message {
    sd_outbox::Message::json("order", order, step, serde_json::json!({}))
}

/// Waits (10 s at most) until `sink` holds `n` events of `orders`, then returns them all.
async fn relayed(
    sink: &sd_outbox::MemoryPublisher,
    orders: &[String],
    n: usize,
) -> Vec<sd_outbox::Event> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let ours = || {
        sink.events()
            .iter()
            .filter(|e| orders.contains(&e.aggregate_id))
            .count()
    };
    while ours() < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.events()
}

/// The outbox scenario on memory: a `MemoryOutbox` transaction per event, one rolled
/// back, a `MemoryRelay` in the background.
async fn outbox_memory(
    orders: &[String],
    ghost: &str,
) -> Result<Vec<sd_outbox::Event>, Box<dyn std::error::Error>> {
    use sd_outbox::MemoryPublisher;
    use sd_outbox::memory::{MemoryOutbox, MemoryRelay};

    let outbox = MemoryOutbox::new();
    for step in ["created", "paid", "shipped"] {
        for order in orders {
            outbox.transaction(|tx| tx.enqueue(order_event(order, step)))?;
        }
    }
    let mut tx = outbox.begin();
    tx.enqueue(order_event(ghost, "created"))?;
    tx.rollback();
    let sink = MemoryPublisher::new();
    let relay = MemoryRelay::builder(outbox.clone(), sink.clone())
        .poll_interval(Duration::from_millis(50))
        .build()?
        .spawn();
    let events = relayed(&sink, orders, 9).await;
    relay.shutdown().await;
    expect(outbox.pending() == 0, "nothing left pending");
    Ok(events)
}

/// On memory: a sink that always fails, so the event reaches the attempt cap and
/// becomes a dead letter; its redrive to a working sink publishes it with the same id.
async fn outbox_memory_dead_letter(order: &str) -> Result<(), Box<dyn std::error::Error>> {
    use sd_outbox::MemoryPublisher;
    use sd_outbox::memory::{MemoryOutbox, MemoryRelay};

    let outbox = MemoryOutbox::new();
    let sink = MemoryPublisher::new();
    // A sink that always fails: 3 attempts, then a dead letter; redrive sends it again.
    let id = outbox.transaction(|tx| tx.enqueue(order_event(order, "refunded")))?;
    let failing = MemoryRelay::builder(outbox.clone(), Refusing)
        .max_attempts(3)
        .retry(
            sd_outbox::RetryPolicy::builder()
                .initial_interval(Duration::from_millis(1))
                .max_interval(Duration::from_millis(4))
                .jitter(0.5)
                .build()?,
        )
        .build()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while outbox.dead_letters().is_empty() && tokio::time::Instant::now() < deadline {
        failing.run_once().await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let dead = outbox.dead_letters();
    expect(
        dead.len() == 1 && dead[0].event.id == id && dead[0].event.attempts == 3,
        "the refund dead-lettered after 3 attempts",
    );
    println!(
        "  a sink that refuses everything: the refund event failed {} times and was dead-lettered ({})",
        failing.failures(),
        dead.first()
            .and_then(|d| d.last_error.as_deref())
            .unwrap_or("no error")
    );
    expect(outbox.redrive(id), "the dead letter redriven");
    let good = MemoryRelay::builder(outbox.clone(), sink.clone()).build()?;
    let republished = good.drain().await?;
    let last = sink.events().last().map(|e| e.id);
    expect(
        republished == 1 && last == Some(id),
        "the redriven refund published once, same id",
    );
    println!(
        "  redriven to a working sink: published {republished} event with the same id; dead letters left: {}",
        outbox.dead_letters().len()
    );
    Ok(())
}

/// A sink whose broker is down.
struct Refusing;

impl sd_outbox::Publisher for Refusing {
    async fn publish(&self, _events: &[sd_outbox::Event]) -> sd_outbox::Result<()> {
        Err(sd_outbox::Error::publish(0, "broker down"))
    }
}

/// The outbox scenario on PostgreSQL: the events in sqlx transactions, one rolled back,
/// a parallel `Relay` in the background.
async fn outbox_postgres(
    pool: &sqlx::PgPool,
    orders: &[String],
    ghost: &str,
) -> Result<Vec<sd_outbox::Event>, Box<dyn std::error::Error>> {
    use sd_outbox::MemoryPublisher;
    use sd_outbox::postgres::{Outbox, Relay};

    let outbox = Outbox::builder().table("tour_outbox").build(pool.clone())?;
    outbox.migrate().await?;
    for step in ["created", "paid", "shipped"] {
        for order in orders {
            let mut tx = pool.begin().await?;
            outbox.enqueue(&mut tx, order_event(order, step)).await?;
            tx.commit().await?;
        }
    }
    let mut tx = pool.begin().await?;
    outbox
        .enqueue(&mut tx, order_event(ghost, "created"))
        .await?;
    tx.rollback().await?;

    let sink = MemoryPublisher::new();
    let relay = Relay::builder(outbox, sink.clone())
        .poll_interval(Duration::from_millis(50))
        .build()?
        .spawn();
    let events = relayed(&sink, orders, 9).await;
    relay.shutdown().await;
    Ok(events)
}
