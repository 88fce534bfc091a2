//! The failover test's oracle: what the writer wrote, what the handlers saw, and the
//! judgement of the raw deliveries.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use sd_pool::redis::Entry;
use uuid::Uuid;

/// How long after a fault a duplicate still counts as the fault's: the consumers'
/// `min_idle` (entries whose acknowledgement the fault lost are claimed after it) and
/// a claim interval.
pub const AFTERMATH: Duration = Duration::from_secs(4);

/// An event as the writer enqueued it: (type, aggregate) and its place in that order.
#[derive(Debug, Clone)]
pub struct Written {
    pub key: (String, String),
    pub n: usize,
    pub at: Instant,
}

/// One delivery a handler saw.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: Uuid,
    pub key: (String, String),
    pub n: usize,
    pub at: Instant,
}

pub fn delivery(entry: &Entry) -> Delivery {
    let payload: serde_json::Value = serde_json::from_slice(entry.get("payload").unwrap()).unwrap();
    Delivery {
        id: entry.get_str("id").unwrap().parse().unwrap(),
        key: (
            entry.get_str("aggregatetype").unwrap().to_owned(),
            entry.get_str("aggregateid").unwrap().to_owned(),
        ),
        n: payload["n"].as_u64().unwrap() as usize,
        at: Instant::now(),
    }
}

/// What the oracle found in the raw deliveries.
pub struct Found {
    pub lost: usize,
    pub lost_in_lagging: usize,
    pub out_of_order: usize,
    pub duplicates: usize,
    pub duplicates_in_windows: usize,
    pub examples: Vec<String>,
}

/// Judges the raw deliveries against what was written: each written event handled at
/// least once, each key's first-time handlings in the order written (the `n`s rise by
/// one, skipping only lost events), duplicates counted by window.
pub fn judge(
    written: &HashMap<Uuid, Written>,
    seen: &[Delivery],
    windows: &[(Instant, Instant)],
) -> Found {
    let mut examples = Vec::new();
    let mut first: HashSet<Uuid> = HashSet::new();
    let mut duplicates = 0;
    let mut duplicates_in_windows = 0;
    // Per key, the `n`s in first-handling order.
    let mut order: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for d in seen {
        if !first.insert(d.id) {
            duplicates += 1;
            if windows
                .iter()
                .any(|(a, b)| (*a..=*b + AFTERMATH).contains(&d.at))
            {
                duplicates_in_windows += 1;
            }
            continue;
        }
        match written.get(&d.id) {
            Some(w) => {
                assert_eq!((&w.key, w.n), (&d.key, d.n), "an entry's fields changed");
            }
            None => panic!("a delivery of an event nobody wrote: {d:?}"),
        }
        order.entry(d.key.clone()).or_default().push(d.n);
    }
    let lost_ids: Vec<&Uuid> = written.keys().filter(|id| !first.contains(id)).collect();
    let lost_at: HashSet<((String, String), usize)> = lost_ids
        .iter()
        .map(|id| (written[*id].key.clone(), written[*id].n))
        .collect();
    for id in &lost_ids {
        let w = &written[*id];
        examples.push(format!("lost: {:?} n={} ({id})", w.key, w.n));
    }
    let mut out_of_order = 0;
    for (key, ns) in &order {
        // The expected order: every n of the key, lost ones left out.
        let mut expected = 0;
        for &n in ns {
            while lost_at.contains(&(key.clone(), expected)) {
                expected += 1;
            }
            if n != expected {
                out_of_order += 1;
                examples.push(format!(
                    "out of order: {key:?} handled n={n} where n={expected} was due"
                ));
            }
            expected = n + 1;
        }
    }
    let lost_in_lagging = lost_ids
        .iter()
        .filter(|id| {
            let (a, b) = windows[2];
            (a..=b).contains(&written[**id].at)
        })
        .count();
    Found {
        lost: lost_ids.len(),
        lost_in_lagging,
        out_of_order,
        duplicates,
        duplicates_in_windows,
        examples,
    }
}
