//! Fencing guards for the protected resource: accept an operation only when its token is
//! not older than the newest the resource has seen.
//!
//! The rule (Kleppmann's fencing tokens; Redisson's `RFencedLock`: "greater or equal"):
//! the resource remembers the largest token it has seen. An operation with a smaller
//! token is refused with [`Error::StaleToken`]; an equal or larger one is accepted and
//! raises the mark. Equal is accepted so one holder can write several times.
//!
//! Fence **reads** too when a holder reads, computes and writes back: otherwise a stale
//! holder that writes before the new holder's first write is accepted and the new
//! holder's read-modify-write loses it. [`FencedRegister::read`] raises the mark.
//!
//! - [`FencedRegister`]: a value in memory behind the rule.
//! - [`redis::RedisFence`] (feature `redis`): a Lua script over a hash `{token, value}`.
//! - [`postgres::PostgresFence`] (feature `postgres`): a one-row check inside the
//!   caller's transaction, before its writes.

use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::lease::FencingToken;

/// A value guarded by fencing tokens (in memory).
#[derive(Debug, Default)]
pub struct FencedRegister<T> {
    inner: Mutex<(Option<FencingToken>, T)>,
}

impl<T> FencedRegister<T> {
    /// A register holding `value`, no token seen yet.
    pub fn new(value: T) -> Self {
        FencedRegister {
            inner: Mutex::new((None, value)),
        }
    }

    fn inner(&self) -> MutexGuard<'_, (Option<FencingToken>, T)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(mark: &mut Option<FencingToken>, token: FencingToken) -> Result<()> {
        match *mark {
            Some(current) if token < current => Err(Error::StaleToken { token, current }),
            _ => {
                *mark = Some(token);
                Ok(())
            }
        }
    }

    /// Raises the mark to `token` without touching the value, or refuses a stale token.
    pub fn check(&self, token: FencingToken) -> Result<()> {
        Self::admit(&mut self.inner().0, token)
    }

    /// Replaces the value if `token` is not stale.
    pub fn write(&self, token: FencingToken, value: T) -> Result<()> {
        let mut inner = self.inner();
        Self::admit(&mut inner.0, token)?;
        inner.1 = value;
        Ok(())
    }

    /// Applies `f` to the value if `token` is not stale, and returns what `f` returns.
    pub fn update<R>(&self, token: FencingToken, f: impl FnOnce(&mut T) -> R) -> Result<R> {
        let mut inner = self.inner();
        Self::admit(&mut inner.0, token)?;
        Ok(f(&mut inner.1))
    }

    /// The newest token seen.
    pub fn last_token(&self) -> Option<FencingToken> {
        self.inner().0
    }
}

impl<T: Clone> FencedRegister<T> {
    /// Reads the value if `token` is not stale, raising the mark to `token`.
    pub fn read(&self, token: FencingToken) -> Result<T> {
        let mut inner = self.inner();
        Self::admit(&mut inner.0, token)?;
        Ok(inner.1.clone())
    }

    /// The value, without a token (for observers, not for holders).
    pub fn peek(&self) -> T {
        self.inner().1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_tokens_are_refused_equal_ones_accepted() {
        let r = FencedRegister::new(0);
        r.write(FencingToken(33), 1).unwrap();
        r.write(FencingToken(33), 2).unwrap();
        assert_eq!(r.read(FencingToken(34)).unwrap(), 2);
        let err = r.write(FencingToken(33), 3).unwrap_err();
        assert!(matches!(
            err,
            Error::StaleToken {
                token: FencingToken(33),
                current: FencingToken(34)
            }
        ));
        assert_eq!(r.peek(), 2);
        assert_eq!(r.last_token(), Some(FencingToken(34)));
    }
}
