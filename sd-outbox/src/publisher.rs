//! The sink seam: [`Publisher`], its boxed twin [`BoxPublisher`], and the in-memory
//! [`MemoryPublisher`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
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
/// An empty batch sends nothing and is acknowledged. The suite in `conformance`
/// (feature `test-util`) checks a sink against this contract.
pub trait Publisher: Send + Sync + 'static {
    /// Sends `events` in order and waits for the broker's acknowledgements.
    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send;

    /// The broker, as OpenTelemetry's `messaging.system` names it (`redis`, `nats`,
    /// `kafka`, `memory`): the label of the relay's metrics and spans. A sink of your
    /// own may keep the default, `"custom"`.
    fn system(&self) -> &'static str {
        "custom"
    }
}

impl<P: Publisher> Publisher for Arc<P> {
    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        (**self).publish(events)
    }

    fn system(&self) -> &'static str {
        (**self).system()
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe twin of [`Publisher`]: the same method, returning a boxed future.
trait DynPublisher: Send + Sync + 'static {
    fn publish<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<()>>;
    fn type_name(&self) -> &'static str;
    fn system(&self) -> &'static str;
}

impl<P: Publisher> DynPublisher for P {
    fn publish<'a>(&'a self, events: &'a [Event]) -> BoxFuture<'a, Result<()>> {
        Box::pin(Publisher::publish(self, events))
    }
    fn type_name(&self) -> &'static str {
        std::any::type_name::<P>()
    }
    fn system(&self) -> &'static str {
        Publisher::system(self)
    }
}

/// Any [`Publisher`] behind one type, so a service picks its sink (memory, Redis Streams,
/// NATS JetStream, Kafka) from its configuration at run time, as tower's `BoxCloneService` does
/// for services. Cheap to clone (an `Arc` inside); it is a [`Publisher`] itself, so a
/// relay takes it as it takes any sink. Each batch costs one allocation for the boxed
/// future.
///
/// ```
/// use sd_outbox::{BoxPublisher, Event, MemoryPublisher, Message, Publisher};
///
/// let memory = MemoryPublisher::new();
/// let sink = match "memory" {
///     "memory" => BoxPublisher::new(memory.clone()),
///     // "redis://..." => BoxPublisher::new(RedisStreamsPublisher::builder(conn).build()?),
///     other => panic!("unknown sink `{other}`"),
/// };
/// let event = Event::from_message(Message::json("order", "o-1", "created", serde_json::json!({})));
/// let rt = tokio::runtime::Builder::new_current_thread().build()?;
/// rt.block_on(sink.publish(std::slice::from_ref(&event)))?;
/// assert_eq!(memory.events()[0].id, event.id);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct BoxPublisher {
    inner: Arc<dyn DynPublisher>,
}

impl BoxPublisher {
    /// Boxes `publisher`.
    pub fn new<P: Publisher>(publisher: P) -> Self {
        BoxPublisher {
            inner: Arc::new(publisher),
        }
    }
}

impl fmt::Debug for BoxPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BoxPublisher")
            .field(&self.inner.type_name())
            .finish()
    }
}

impl Publisher for BoxPublisher {
    async fn publish(&self, events: &[Event]) -> Result<()> {
        self.inner.publish(events).await
    }

    fn system(&self) -> &'static str {
        self.inner.system()
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
    fn system(&self) -> &'static str {
        sd_core::observe::backend::MEMORY
    }

    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        self.lock().extend_from_slice(events);
        std::future::ready(Ok(()))
    }
}
