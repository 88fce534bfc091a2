//! The tour's sd-saga scenario: an order whose last step fails, undone in reverse.

use super::{Backends, attempt, expect, fail};

/// The saga data: the order, and whether the warehouse will refuse it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Trip {
    order: String,
    refuse: bool,
}

/// sd-saga: a four-step order whose last step fails: the three done before it are undone,
/// last first; the same saga with no failure completes.
pub(crate) async fn saga(backends: &Backends) {
    use sd_saga::MemoryStore;
    use sd_saga::postgres::PostgresStore;

    match &backends.postgres {
        Some(pool) => {
            println!("\n== sd-saga: an order whose last step fails, log on PostgreSQL ==");
            attempt(async {
                let store = PostgresStore::builder()
                    .table("tour_sagas")
                    .build(pool.clone())?;
                store.migrate().await?;
                saga_run(store, &backends.run).await;
                Ok(())
            })
            .await;
        }
        None => {
            println!("\n== sd-saga: an order whose last step fails, log on memory ==");
            saga_run(MemoryStore::new(), &backends.run).await;
        }
    }
}

async fn saga_run(store: impl sd_saga::SagaStore, run: &str) {
    use std::sync::{Arc, Mutex};

    use sd_saga::{Orchestrator, Saga, SagaOutcome, Step, StepError};

    type Ledger = Arc<Mutex<Vec<String>>>;
    let ledger: Ledger = Arc::default();
    let note = |ledger: &Ledger, line: String| {
        if let Ok(mut l) = ledger.lock() {
            l.push(line);
        }
    };
    // A compensatable step: `does` forward, `undoes` when a later step fails.
    let step = |name: &'static str, does: &'static str, undoes: &'static str| {
        let (fwd, back) = (ledger.clone(), ledger.clone());
        Step::compensatable(
            name,
            move |_, trip: Trip| {
                note(&fwd, format!("{does} ({})", trip.order));
                std::future::ready(Ok::<_, StepError>(trip))
            },
            move |_, trip: Trip| {
                note(&back, format!("{undoes} ({})", trip.order));
                std::future::ready(Ok(()))
            },
        )
    };
    let confirm_ledger = ledger.clone();
    let built = Saga::builder("tour-order")
        .step(step("reserve_stock", "stock reserved", "stock released"))
        .step(step("charge_card", "card charged", "card refunded"))
        .step(step("book_courier", "courier booked", "courier cancelled"))
        .step(Step::pivot("confirm", move |_, trip: Trip| {
            let result = if trip.refuse {
                note(
                    &confirm_ledger,
                    format!("warehouse refuses ({})", trip.order),
                );
                Err(StepError::permanent("the warehouse refuses the order"))
            } else {
                note(&confirm_ledger, format!("order confirmed ({})", trip.order));
                Ok(trip)
            };
            std::future::ready(result)
        }))
        .build()
        .and_then(|saga| Orchestrator::builder(saga, store).build());
    let orchestrator = match built {
        Ok(o) => o,
        Err(e) => return fail(format!("failed: {e}")),
    };
    for (order, refuse) in [("order-1", false), ("order-2", true)] {
        let trip = Trip {
            order: order.to_owned(),
            refuse,
        };
        let id = format!("{order}-{run}");
        match orchestrator.run(id.clone(), trip).await {
            Ok(SagaOutcome::Completed(_)) => println!("  {order}: completed"),
            Ok(SagaOutcome::Compensated { reason }) => {
                println!("  {order}: compensated ({reason})")
            }
            Ok(other) => fail(format!("{order}: {other:?}")),
            Err(e) => fail(format!("{order}: failed: {e}")),
        }
        let logged = orchestrator.events(&id).await.map(|e| e.len()).unwrap_or(0);
        let lines = ledger
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        println!("    what happened, in order: {}", lines.join(" -> "));
        let undone: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.split(" (").next())
            .skip(4)
            .collect();
        let expected: &[&str] = if refuse {
            &["courier cancelled", "card refunded", "stock released"]
        } else {
            &[]
        };
        expect(
            undone == expected,
            "compensations in reverse, and only for order-2",
        );
        println!(
            "    {logged} events in the saga log (an intent before and an outcome after each call)"
        );
    }
    let m = orchestrator.local_metrics();
    expect(m.compensations_run == 3, "3 compensations run");
    println!(
        "  compensations run: {} (in reverse: the courier first, the stock last)",
        m.compensations_run
    );
}
