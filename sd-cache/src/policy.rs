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
    /// The longest lifetime a loader may choose (`None`: the `ttl`).
    pub(crate) max_ttl: Option<Duration>,
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
            max_ttl: None,
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
        if let Some(max) = self.max_ttl
            && (max < self.ttl || max > MAX_TTL)
        {
            return Err(Error::InvalidConfig {
                field: "max_ttl",
                reason: "must be at least `ttl` and at most 100 years".into(),
            });
        }
        xfetch::check_beta(self.beta)
    }

    /// The longest lifetime an entry can have before jitter: `max_ttl`, else the `ttl`.
    fn longest(&self) -> Duration {
        self.max_ttl.unwrap_or(self.ttl)
    }

    /// How long an entry loaded now stays fresh. `None` when it must not be cached at all
    /// (a "not found" with negative caching off, or a lifetime of zero).
    ///
    /// Without a `chosen` lifetime: the TTL (or negative TTL) plus a uniform jitter in
    /// `[0, ttl_jitter]`. With one (the loader's): that lifetime, at most the longest
    /// allowed, plus a jitter in proportion (`ttl_jitter / ttl` of it); a "not found" gets
    /// no jitter, as with the negative TTL.
    pub(crate) fn lifetime(
        &self,
        negative: bool,
        chosen: Option<Duration>,
        random: &dyn RandomSource,
    ) -> Option<Duration> {
        if negative {
            self.negative_ttl?;
            return match chosen {
                None => self.negative_ttl,
                Some(l) if l.is_zero() => None,
                Some(l) => Some(l.min(self.longest_negative())),
            };
        }
        let (base, jitter) = match chosen {
            None => (self.ttl, self.ttl_jitter),
            Some(l) if l.is_zero() => return None,
            Some(l) => {
                let l = l.min(self.longest());
                let share = l.as_secs_f64() / self.ttl.as_secs_f64();
                (l, self.ttl_jitter.mul_f64(share))
            }
        };
        if jitter.is_zero() {
            return Some(base);
        }
        Some(base + jitter.mul_f64(random.unit().clamp(0.0, 1.0)))
    }

    /// The longest a "not found" may be cached.
    fn longest_negative(&self) -> Duration {
        self.longest().max(self.negative_ttl.unwrap_or_default())
    }

    /// The longest any entry must be kept: its freshness plus its stale-on-error window.
    pub(crate) fn max_retention(&self) -> Duration {
        let jitter = self
            .ttl_jitter
            .mul_f64(self.longest().as_secs_f64() / self.ttl.as_secs_f64());
        let fresh = (self.longest() + jitter).max(self.longest_negative());
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

        /// The longest lifetime a loader may choose for an entry through
        /// `try_get_or_load_expiring` (default: the `ttl`; at least the `ttl`). Longer
        /// choices are cut to it, so a wrong upstream header cannot pin a value for a year.
        pub fn max_ttl(mut self, max: Duration) -> Self {
            self.$($at.)?policy.max_ttl = Some(max);
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
        let cases: [(&str, Policy); 6] = [
            (
                "max_ttl",
                Policy {
                    max_ttl: Some(Duration::from_secs(59)),
                    ..Policy::default()
                },
            ),
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
            p.lifetime(false, None, &FixedRandom(1.0)),
            Some(Duration::from_secs(66))
        );
        let low = p
            .lifetime(false, None, &FixedRandom(0.0))
            .unwrap_or_default();
        assert!(low >= Duration::from_secs(60) && low < Duration::from_millis(60_001));
        assert_eq!(
            p.lifetime(true, None, &FixedRandom(1.0)),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn a_chosen_lifetime_is_cut_to_max_ttl_and_jittered_in_proportion() {
        let p = Policy {
            ttl_jitter: Duration::from_secs(6),
            max_ttl: Some(Duration::from_secs(3600)),
            ..Policy::default()
        };
        let one = FixedRandom(1.0);
        let secs = |s| Some(Duration::from_secs(s));
        // 10% jitter of the ttl is 10% of the chosen lifetime.
        assert_eq!(p.lifetime(false, secs(10), &one), secs(11));
        assert_eq!(p.lifetime(false, secs(7200), &one), secs(3960));
        assert_eq!(p.lifetime(false, Some(Duration::ZERO), &one), None);
        // "Not found" takes the loader's lifetime without jitter, unless caching it is off.
        assert_eq!(p.lifetime(true, secs(30), &one), secs(30));
        assert_eq!(p.lifetime(true, Some(Duration::ZERO), &one), None);
        let off = Policy {
            negative_ttl: None,
            ..p.clone()
        };
        assert_eq!(off.lifetime(true, secs(30), &one), None);
        assert_eq!(p.max_retention(), Duration::from_secs(3960));
    }

    proptest::proptest! {
        /// A chosen lifetime is kept as chosen up to `max_ttl`, plus at most its share of
        /// the jitter; zero is never cached; the engine keeps every entry long enough.
        #[test]
        fn chosen_lifetimes_stay_within_their_bounds(
            ttl_s in 1u64..1_000, jitter_pct in 0u64..=100, max_extra_s in 0u64..10_000,
            chosen_ms in 0u64..20_000_000, u in 0.0f64..=1.0, negative: bool,
        ) {
            let ttl = Duration::from_secs(ttl_s);
            let p = Policy {
                ttl,
                ttl_jitter: ttl * u32::try_from(jitter_pct).unwrap_or(0) / 100,
                max_ttl: Some(ttl + Duration::from_secs(max_extra_s)),
                ..Policy::default()
            };
            proptest::prop_assert!(p.validate().is_ok());
            let chosen = Duration::from_millis(chosen_ms);
            let life = p.lifetime(negative, Some(chosen), &FixedRandom(u));
            if chosen.is_zero() {
                proptest::prop_assert_eq!(life, None);
            } else {
                let life = life.unwrap_or_default();
                let longest = if negative { p.longest_negative() } else { p.longest() };
                let kept = chosen.min(longest);
                proptest::prop_assert!(life >= kept);
                let share = p.ttl_jitter.mul_f64(kept.as_secs_f64() / ttl.as_secs_f64());
                proptest::prop_assert!(life <= kept + share + Duration::from_nanos(1));
                proptest::prop_assert!(life <= p.max_retention() + Duration::from_nanos(1));
            }
        }
    }
}
