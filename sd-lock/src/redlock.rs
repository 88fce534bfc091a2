//! Redlock over N independent Redis masters.

use std::fmt;
use std::time::Duration;

/// Why one master did not grant (or release) the lock.
#[derive(Debug)]
#[non_exhaustive]
pub enum NodeFailure {
    /// The master holds the resource for another holder.
    Held {
        /// The master's name (its address unless named otherwise).
        node: String,
    },
    /// The master did not answer within the per-node timeout.
    TimedOut {
        /// The master's name.
        node: String,
        /// The per-node timeout.
        after: Duration,
    },
    /// The master answered with an error, or the connection failed.
    Failed {
        /// The master's name.
        node: String,
        /// The client error.
        source: redis::RedisError,
    },
}

impl NodeFailure {
    /// The master's name.
    pub fn node(&self) -> &str {
        match self {
            NodeFailure::Held { node }
            | NodeFailure::TimedOut { node, .. }
            | NodeFailure::Failed { node, .. } => node,
        }
    }
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeFailure::Held { node } => write!(f, "{node}: held by another holder"),
            NodeFailure::TimedOut { node, after } => {
                write!(f, "{node}: no answer within {after:?}")
            }
            NodeFailure::Failed { node, source } => write!(f, "{node}: {source}"),
        }
    }
}
