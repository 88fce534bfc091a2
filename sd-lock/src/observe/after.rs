//! [`After`]: a future that hands its output to a callback when it is ready, stored once.
//!
//! The meters wrap every backend call in one. An `async fn` that took the call's future
//! as an argument and awaited it would keep two copies of it in its state (the argument
//! and the awaited value); backends' futures are large (etcd's gRPC calls), and in debug
//! builds the doubled futures of a test's call chain overflowed a thread's stack.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use super::{Start, start};

pin_project_lite::pin_project! {
    /// Runs `inner`, then calls `done` with its output and the time its first poll
    /// began, and returns the output.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct After<F, D> {
        #[pin]
        inner: F,
        done: Option<D>,
        started: Option<Start>,
    }
}

/// `inner`, then `done(&output, start)`.
pub(crate) fn after<F, D>(inner: F, done: D) -> After<F, D>
where
    F: Future,
    D: FnOnce(&F::Output, Start),
{
    After {
        inner,
        done: Some(done),
        started: None,
    }
}

impl<F, D> Future for After<F, D>
where
    F: Future,
    D: FnOnce(&F::Output, Start),
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let started = *this.started.get_or_insert_with(start);
        let output = ready!(this.inner.poll(cx));
        if let Some(done) = this.done.take() {
            done(&output, started);
        }
        Poll::Ready(output)
    }
}
