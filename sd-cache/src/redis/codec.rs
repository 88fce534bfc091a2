//! Turning values into bytes and back.

use super::*;

/// Turns values into bytes and back. Every process sharing a prefix must use the same codec.
pub trait Codec<V>: Send + Sync + fmt::Debug + 'static {
    /// Encodes `value`.
    fn encode(&self, value: &V) -> std::result::Result<Vec<u8>, SharedError>;
    /// Decodes bytes written by [`encode`](Self::encode).
    fn decode(&self, bytes: &[u8]) -> std::result::Result<V, SharedError>;
}

/// JSON through `serde_json` (the default codec).
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl<V: serde::Serialize + serde::de::DeserializeOwned> Codec<V> for JsonCodec {
    fn encode(&self, value: &V) -> std::result::Result<Vec<u8>, SharedError> {
        serde_json::to_vec(value).map_err(|e| Arc::new(e) as SharedError)
    }

    fn decode(&self, bytes: &[u8]) -> std::result::Result<V, SharedError> {
        serde_json::from_slice(bytes).map_err(|e| Arc::new(e) as SharedError)
    }
}
