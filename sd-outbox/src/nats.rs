//! The NATS JetStream sink: one publish per event to `{prefix}.{aggregate type}`, with
//! `Nats-Msg-Id` set to the outbox id so the stream drops duplicates within its
//! duplicate window; every publish acknowledgement is awaited.
//!
//! Headers: `Nats-Msg-Id`, `Outbox-Aggregate-Type`, `Outbox-Aggregate-Id`,
//! `Outbox-Type`, `Outbox-Payload-Kind` (`json` or `bytes`), then the event's own
//! headers. The stream must exist and capture the subjects (e.g. `outbox.>`); see
//! [`JetStreamPublisher::ensure_stream`]. An aggregate type that is not a valid subject
//! token (empty, or containing whitespace, `.`, `*` or `>`), or an event with a header
//! name that is not printable ASCII (a space, a non-ASCII letter), fails to publish and
//! is eventually dead-lettered.

use std::future::Future;
use std::str::FromStr as _;

use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, HeaderName};

use crate::error::{Error, Result};
use crate::message::Event;
use crate::publisher::Publisher;

/// Options of a [`JetStreamPublisher`].
#[derive(Debug, Clone)]
pub struct JetStreamPublisherBuilder {
    context: Context,
    prefix: String,
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>'))
}

impl JetStreamPublisherBuilder {
    /// The subject prefix (default `outbox`): one or more valid subject tokens joined by
    /// `.`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The publisher; fails with [`Error::InvalidConfig`] naming `prefix`.
    pub fn build(self) -> Result<JetStreamPublisher> {
        if !self.prefix.split('.').all(valid_token) {
            return Err(Error::config(
                "prefix",
                format!(
                    "`{}` must be subject tokens joined by `.`, without spaces, `*` or `>`",
                    self.prefix
                ),
            ));
        }
        Ok(JetStreamPublisher {
            context: self.context,
            prefix: self.prefix,
        })
    }
}

/// Publishes to NATS JetStream; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct JetStreamPublisher {
    context: Context,
    prefix: String,
}

impl JetStreamPublisher {
    /// Options on a JetStream `context` (its timeout bounds each acknowledgement).
    pub fn builder(context: Context) -> JetStreamPublisherBuilder {
        JetStreamPublisherBuilder {
            context,
            prefix: "outbox".into(),
        }
    }

    /// The subject an aggregate type goes to.
    pub fn subject(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.prefix)
    }

    /// Creates the stream `name` capturing `{prefix}.>` with a duplicate window of
    /// `duplicate_window`, unless a stream of that name exists.
    pub async fn ensure_stream(
        &self,
        name: &str,
        duplicate_window: std::time::Duration,
    ) -> Result<()> {
        self.context
            .get_or_create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{}.>", self.prefix)],
                duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Backend {
                backend: "nats",
                source: format!("cannot create stream `{name}`: {e}").into(),
            })?;
        Ok(())
    }

    /// The message headers, or why one of the event's own header names cannot be sent
    /// (NATS takes printable ASCII without `:`; async-nats panics on others).
    fn headers(event: &Event) -> std::result::Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        for (name, value) in &event.headers {
            let name = HeaderName::from_str(name).map_err(|_| {
                format!("header name `{name}` is not printable ASCII; NATS cannot send it")
            })?;
            headers.insert(name, value.as_str());
        }
        headers.insert("Nats-Msg-Id", event.id.to_string());
        headers.insert("Outbox-Aggregate-Type", event.aggregate_type.as_str());
        headers.insert("Outbox-Aggregate-Id", event.aggregate_id.as_str());
        headers.insert("Outbox-Type", event.event_type.as_str());
        headers.insert("Outbox-Payload-Kind", event.payload.kind());
        Ok(headers)
    }
}

impl Publisher for JetStreamPublisher {
    fn system(&self) -> &'static str {
        sd_core::observe::backend::NATS
    }

    fn publish(&self, events: &[Event]) -> impl Future<Output = Result<()>> + Send {
        // Everything borrowed from `events` is built before the future, so it is 'static.
        let messages: Vec<_> = events
            .iter()
            .map(|event| {
                (
                    valid_token(&event.aggregate_type),
                    self.subject(&event.aggregate_type),
                    Self::headers(event),
                    bytes::Bytes::from(event.payload.to_bytes()),
                )
            })
            .collect();
        let context = self.context.clone();
        async move {
            // Send them all in order, then await the acks in order.
            let mut acks = Vec::with_capacity(messages.len());
            let mut failure = None;
            for (i, (valid, subject, headers, payload)) in messages.into_iter().enumerate() {
                if !valid {
                    failure = Some(Error::publish(
                        i,
                        format!(
                            "aggregate type of subject `{subject}` is not a valid subject token"
                        ),
                    ));
                    break;
                }
                let headers = match headers {
                    Ok(headers) => headers,
                    Err(reason) => {
                        failure = Some(Error::publish(i, reason));
                        break;
                    }
                };
                match context
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    Ok(ack) => acks.push(ack),
                    Err(e) => {
                        failure = Some(Error::publish(i, format!("nats: {e}")));
                        break;
                    }
                }
            }
            for (i, ack) in acks.into_iter().enumerate() {
                if let Err(e) = ack.await {
                    return Err(Error::publish(i, format!("nats ack: {e}")));
                }
            }
            failure.map_or(Ok(()), Err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Message;

    #[test]
    fn the_events_headers_are_sent_and_a_name_nats_cannot_carry_is_an_error_not_a_panic() {
        let message = Message::json("order", "o-1", "created", serde_json::json!({}))
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("Nats-Msg-Id", "not the id");
        let event = Event::from_message(message);
        let headers = JetStreamPublisher::headers(&event).expect("printable names");
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(
            get("traceparent").as_deref(),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
        assert_eq!(
            get("Nats-Msg-Id"),
            Some(event.id.to_string()),
            "sd's own win"
        );
        assert_eq!(get("Outbox-Aggregate-Id").as_deref(), Some("o-1"));

        // `validate` lets these through (Redis and Kafka carry them); NATS cannot.
        for name in ["trace id", "tracé"] {
            let message =
                Message::json("order", "o-1", "created", serde_json::json!({})).header(name, "v");
            assert!(message.validate().is_ok());
            let refused = JetStreamPublisher::headers(&Event::from_message(message));
            assert!(refused.is_err_and(|reason| reason.contains(name)), "{name}");
        }
    }
}
