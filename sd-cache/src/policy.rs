//! Freshness settings shared by every backend: TTL, jitter, negative TTL, stale-on-error, beta.

use std::time::Duration;

use crate::clock::RandomSource;
use crate::{Error, Result, xfetch};

/// Longest TTL accepted anywhere (100 years), so deadline arithmetic never overflows.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

#[derive(Debug, Clone)]
pub(crate) struct Policy {
    pub(crate) ttl: Duration,
    pub(crate) ttl_jitter: Duration,
    pub(crate) negative_ttl: Option<Duration>,
    pub(crate) stale_if_error: Duration,
    pub(crate) beta: f64,
    pub(crate) early_refresh: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            ttl_jitter: Duration::ZERO,
            negative_ttl: Some(Duration::from_secs(5)),
            stale_if_error: Duration::ZERO,
            beta: xfetch::DEFAULT_BETA,
            early_refresh: true,
        }
    }
}

impl Policy {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.ttl.is_zero() || self.ttl > MAX_TTL {
            return Err(Error::InvalidConfig {
                field: "ttl",
                reason: "must be above zero and at most 100 years".into(),
            });
        }
        if self.ttl_jitter > self.ttl {
            return Err(Error::InvalidConfig {
                field: "ttl_jitter",
                reason: "must not exceed `ttl`; a jitter of 5-20% of the ttl is typical".into(),
            });
        }
        if let Some(n) = self.negative_ttl
            && (n.is_zero() || n > MAX_TTL)
        {
            return Err(Error::InvalidConfig {
                field: "negative_ttl",
                reason: "must be above zero and at most 100 years; use `no_negative_caching()` to turn it off".into(),
            });
        }
        if self.stale_if_error > MAX_TTL {
            return Err(Error::InvalidConfig {
                field: "stale_if_error",
                reason: "must be at most 100 years".into(),
            });
        }
        xfetch::check_beta(self.beta)
    }

    /// How long an entry loaded now stays fresh: the TTL (or negative TTL) plus a uniform
    /// jitter in `[0, ttl_jitter]`. `None` when the value must not be cached at all.
    pub(crate) fn lifetime(&self, negative: bool, random: &dyn RandomSource) -> Option<Duration> {
        if negative {
            return self.negative_ttl;
        }
        if self.ttl_jitter.is_zero() {
            return Some(self.ttl);
        }
        Some(self.ttl + self.ttl_jitter.mul_f64(random.unit().clamp(0.0, 1.0)))
    }

    /// The longest any entry must be kept: its freshness plus its stale-on-error window.
    pub(crate) fn max_retention(&self) -> Duration {
        let fresh = (self.ttl + self.ttl_jitter).max(self.negative_ttl.unwrap_or_default());
        fresh.saturating_add(self.stale_if_error)
    }

    /// When reads may start refreshing an entry early (never, with early refresh off).
    pub(crate) fn refresh_from(&self, expiry: Duration, delta: Duration) -> Duration {
        if self.early_refresh {
            xfetch::refresh_window_start(expiry, delta, self.beta)
        } else {
            Duration::MAX
        }
    }
}

/// The freshness setters shared by every builder: each builder has `policy: Policy` and
/// `random: Arc<dyn RandomSource>` fields, or, given `at`, a field `at` that has them.
macro_rules! policy_setters {
    ($($at:ident)?) => {
        /// How long a loaded or inserted value stays fresh (default 60 s; Redis keeps whole
        /// milliseconds).
        pub fn ttl(mut self, ttl: Duration) -> Self {
            self.$($at.)?policy.ttl = ttl;
            self
        }

        /// Adds a uniform random `[0, jitter]` to each entry's TTL so keys loaded together
        /// do not expire together (default 0; at most `ttl`).
        pub fn ttl_jitter(mut self, jitter: Duration) -> Self {
            self.$($at.)?policy.ttl_jitter = jitter;
            self
        }

        /// How long a "not found" from an optional loader is cached (default 5 s).
        pub fn negative_ttl(mut self, ttl: Duration) -> Self {
            self.$($at.)?policy.negative_ttl = Some(ttl);
            self
        }

        /// Do not cache "not found" at all.
        pub fn no_negative_caching(mut self) -> Self {
            self.$($at.)?policy.negative_ttl = None;
            self
        }

        /// After expiry, keep the value this long to answer reads whose reload fails
        /// (default 0: an error is returned as soon as the value expires).
        pub fn stale_if_error(mut self, window: Duration) -> Self {
            self.$($at.)?policy.stale_if_error = window;
            self
        }

        /// XFetch's `beta` (default 1.0): above 1 refreshes earlier, below 1 later.
        pub fn beta(mut self, beta: f64) -> Self {
            self.$($at.)?policy.beta = beta;
            self
        }

        /// Turns XFetch early refresh on or off (default on). Off, a hot key's expiry makes
        /// one caller wait for the load (the others coalesce on it).
        pub fn early_refresh(mut self, on: bool) -> Self {
            self.$($at.)?policy.early_refresh = on;
            self
        }

        /// The random source for XFetch, jitter and lock tokens (default
        /// [`ThreadRandom`](crate::clock::ThreadRandom)).
        pub fn random(mut self, random: impl crate::clock::RandomSource) -> Self {
            self.$($at.)?random = Arc::new(random);
            self
        }
    };
}
pub(crate) use policy_setters;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::FixedRandom;

    #[test]
    fn invalid_settings_name_their_field() {
        let cases: [(&str, Policy); 5] = [
            (
                "ttl",
                Policy {
                    ttl: Duration::ZERO,
                    ..Policy::default()
                },
            ),
            (
                "ttl_jitter",
                Policy {
                    ttl_jitter: Duration::from_secs(61),
                    ..Policy::default()
                },
            ),
            (
                "negative_ttl",
                Policy {
                    negative_ttl: Some(Duration::ZERO),
                    ..Policy::default()
                },
            ),
            (
                "stale_if_error",
                Policy {
                    stale_if_error: Duration::MAX,
                    ..Policy::default()
                },
            ),
            (
                "beta",
                Policy {
                    beta: 0.0,
                    ..Policy::default()
                },
            ),
        ];
        for (field, p) in cases {
            match p.validate() {
                Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let p = Policy {
            ttl_jitter: Duration::from_secs(6),
            ..Policy::default()
        };
        assert_eq!(
            p.lifetime(false, &FixedRandom(1.0)),
            Some(Duration::from_secs(66))
        );
        let low = p.lifetime(false, &FixedRandom(0.0)).unwrap_or_default();
        assert!(low >= Duration::from_secs(60) && low < Duration::from_millis(60_001));
        assert_eq!(
            p.lifetime(true, &FixedRandom(1.0)),
            Some(Duration::from_secs(5))
        );
    }
}
