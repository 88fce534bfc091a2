//! Helpers shared by the integration tests.
#![allow(dead_code)] // Each test binary uses its own subset.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
pub(crate) use sd_testkit::{eventually, runtime};

/// A connection that gives up after `timeout` (a hang guard, and how a frozen server
/// turns into a typed error) and retries a lost connection once.
pub(crate) async fn manager_with_timeout(url: &str, timeout: Duration) -> ConnectionManager {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    redis::Client::open(url)
        .unwrap()
        .get_connection_manager_with_config(config)
        .await
        .unwrap()
}
