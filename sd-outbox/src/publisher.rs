//! The sink seam: [`Publisher`], and the in-memory [`MemoryPublisher`].

use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::message::Event;

/// Sends events to a broker.
///
/// # Contract
///
/// `publish` sends `events` in the order given and returns once the broker has
/// acknowledged them (stored them durably, as far as the broker promises). On failure
/// it returns [`Error::Publish`](crate::Error::Publish) with `published` = the number of
/// leading events that were acknowledged; the relay marks those published and retries
/// the rest. Events past `published` may have reached the broker anyway (a lost ack):
/// they are sent again later under the same id, which is why delivery is at least once
/// and consumers dedupe on [`Event::id`]. Any other error counts as `published = 0`.
pub trait Publisher: Send + Sync + 'static {
    /// Sends `events` in order and waits for the broker's acknowledgements.
    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send;
}

impl<P: Publisher> Publisher for Arc<P> {
    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        (**self).publish(events)
    }
}

/// Keeps published events in memory, in publish order: for tests, demos and for
/// handing events to an in-process consumer.
#[derive(Debug, Clone, Default)]
pub struct MemoryPublisher {
    events: Arc<Mutex<Vec<Event>>>,
}

impl MemoryPublisher {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event published so far, in order (duplicates included).
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// How many events were published (duplicates included).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when nothing was published yet.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Removes and returns the events published so far.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Publisher for MemoryPublisher {
    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        self.lock().extend_from_slice(events);
        std::future::ready(Ok(()))
    }
}
