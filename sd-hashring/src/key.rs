//! Keys as bytes: the fixed encoding every placement hashes.
//!
//! Placement must not depend on `std::hash::Hash`: its output may change between Rust
//! releases, and it differs between platforms (a `usize` length is written as 4 or 8
//! bytes). Every key is therefore turned into a byte string with a fixed, documented
//! encoding, and only those bytes are hashed.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::Arc;

/// A value that can be placed: it exposes a stable byte encoding.
///
/// | type | bytes hashed |
/// |---|---|
/// | `str`, `String`, `Box<str>`, `Arc<str>`, `Cow<str>` | the UTF-8 bytes |
/// | `[u8]`, `Vec<u8>`, `[u8; N]`, `Cow<[u8]>` | the bytes as they are |
/// | [`Bytes<T>`] for any `T: AsRef<[u8]>` | `t.as_ref()` |
/// | `u8`..`u128`, `i8`..`i128` | the value in little-endian, at the type's width |
/// | `usize`, `isize` | as `u64` / `i64`, so 32- and 64-bit hosts agree |
///
/// Integers of different widths are different keys: `5u32` hashes 4 bytes, `5u64`
/// hashes 8. Pick one integer type per key space and keep it.
///
/// Implement it for your own key types by handing the closure a byte string that will
/// never change for the same logical key (for example a big-endian id followed by a
/// tenant name).
pub trait RingKey {
    /// Calls `f` with the key's bytes. Implementations must not allocate for fixed-size
    /// keys; the ring's lookups rely on it to stay allocation-free.
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R;
}

impl<T: RingKey + ?Sized> RingKey for &T {
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        (**self).with_key_bytes(f)
    }
}

macro_rules! str_key {
    ($($t:ty),* $(,)?) => {$(
        impl RingKey for $t {
            fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
                f(self.as_bytes())
            }
        }
    )*};
}

macro_rules! bytes_key {
    ($($t:ty),* $(,)?) => {$(
        impl RingKey for $t {
            fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
                let bytes: &[u8] = self;
                f(bytes)
            }
        }
    )*};
}

str_key!(str, String, Box<str>, Arc<str>, Rc<str>, Cow<'_, str>);
bytes_key!([u8], Vec<u8>, Box<[u8]>, Arc<[u8]>, Rc<[u8]>, Cow<'_, [u8]>);

impl<const N: usize> RingKey for [u8; N] {
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(self)
    }
}

macro_rules! int_key {
    ($($t:ty),* $(,)?) => {$(
        impl RingKey for $t {
            fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
                f(&self.to_le_bytes())
            }
        }
    )*};
}

int_key!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);

impl RingKey for usize {
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&(*self as u64).to_le_bytes())
    }
}

impl RingKey for isize {
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&(*self as i64).to_le_bytes())
    }
}

/// Places any `T: AsRef<[u8]>` (such as `bytes::Bytes` or a `SmallVec`) by its bytes.
///
/// ```
/// use sd_hashring::{Bytes, HashRing, Node};
/// let ring = HashRing::new([Node::new("a"), Node::new("b")])?;
/// assert_eq!(ring.node(Bytes(b"user:42".to_vec())), ring.node("user:42"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Bytes<T>(pub T);

impl<T: AsRef<[u8]>> RingKey for Bytes<T> {
    fn with_key_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(self.0.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(key: impl RingKey) -> Vec<u8> {
        key.with_key_bytes(<[u8]>::to_vec)
    }

    #[test]
    fn encodings_are_fixed() {
        assert_eq!(bytes_of("ab"), b"ab");
        assert_eq!(bytes_of(String::from("ab")), b"ab");
        assert_eq!(bytes_of(&b"ab"[..]), b"ab");
        assert_eq!(bytes_of(*b"ab"), b"ab");
        assert_eq!(bytes_of(Bytes(vec![1u8, 2])), [1, 2]);
        assert_eq!(bytes_of(0x0102u16), [2, 1]);
        assert_eq!(bytes_of(1u64), [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes_of(1usize), bytes_of(1u64));
        assert_eq!(bytes_of(-1isize), bytes_of(-1i64));
        assert_eq!(bytes_of(-1i8), [0xff]);
    }
}
