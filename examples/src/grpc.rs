//! The gRPC service glue tonic-build would generate, written once by hand (no build
//! script, no protoc) for the examples that serve and call unary methods: a service is a
//! type implementing [`Rpc`], served by [`Server`] and called with [`unary`].

use std::convert::Infallible;
use std::sync::Arc;

use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, body::Body};
use tonic_prost::ProstCodec;

/// One gRPC service: its name, its message types and a handler per method.
pub trait Rpc: Send + Sync + 'static {
    /// `package.Service`.
    const NAME: &'static str;
    /// The request message of every method.
    type Req: prost::Message + Default + Send + 'static;
    /// The reply message of every method.
    type Reply: prost::Message + Default + Send + 'static;
    /// Handles `method` (the last path segment).
    fn handle(
        self: Arc<Self>,
        method: String,
        request: Request<Self::Req>,
    ) -> BoxFuture<Response<Self::Reply>, Status>;
}

/// The server side: routes `/{NAME}/{Method}` to [`Rpc::handle`].
#[derive(Debug)]
pub struct Server<T>(pub Arc<T>);

impl<T> Clone for Server<T> {
    fn clone(&self) -> Self {
        Server(self.0.clone())
    }
}

impl<T: Rpc> NamedService for Server<T> {
    const NAME: &'static str = T::NAME;
}

impl<T: Rpc> Service<http::Request<Body>> for Server<T> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let service = self.0.clone();
        let method = request
            .uri()
            .path()
            .strip_prefix(&format!("/{}/", T::NAME))
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<T::Reply, T::Req>::default());
            Ok(grpc.unary(Method(service, method), request).await)
        })
    }
}

struct Method<T>(Arc<T>, String);

impl<T: Rpc> UnaryService<T::Req> for Method<T> {
    type Response = T::Reply;
    type Future = BoxFuture<Response<T::Reply>, Status>;

    fn call(&mut self, request: Request<T::Req>) -> Self::Future {
        self.0.clone().handle(self.1.clone(), request)
    }
}

/// The client side: one unary call on a shared HTTP/2 channel.
pub async fn unary<Req, Reply>(
    channel: &Channel,
    path: &'static str,
    request: Request<Req>,
) -> Result<Response<Reply>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Reply: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(request, path, ProstCodec::<Req, Reply>::default())
        .await
}

/// A metadata entry as text; a value that is not visible ASCII is refused.
pub fn metadata<T>(request: &Request<T>, name: &str) -> Result<Option<String>, Status> {
    match request.metadata().get(name).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(text)) => Ok(Some(text.to_owned())),
        Some(Err(_)) => Err(Status::invalid_argument(format!(
            "`{name}` must be printable ascii"
        ))),
    }
}

/// The outcomes of a `run_once` call as gRPC statuses: the work's own status, `ABORTED`
/// with metadata `retry-after-ms` while the key is in flight (after calling `in_flight`),
/// `FAILED_PRECONDITION` for a key reused for another request, `INVALID_ARGUMENT` for an
/// invalid key, `UNAVAILABLE` when the store failed.
#[cfg(any(feature = "idempotency-grpc", feature = "checkout"))]
pub fn run_once_status(
    error: sd_idempotency::RunError<Status>,
    in_flight: impl FnOnce(),
) -> Status {
    use sd_idempotency::{Error, RunError};
    let error = match error {
        RunError::Work(status) => return status,
        RunError::Idempotency(error) => error,
        other => return Status::internal(other.to_string()),
    };
    let message = error.to_string();
    match error {
        Error::InFlight { retry_after } => {
            in_flight();
            let mut status = Status::aborted(message);
            let ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
            status.metadata_mut().insert("retry-after-ms", ms.into());
            status
        }
        Error::Mismatch { .. } => Status::failed_precondition(message),
        Error::InvalidKey { .. } => Status::invalid_argument(message),
        e if e.is_store_failure() => Status::unavailable(message),
        _ => Status::internal(message),
    }
}
