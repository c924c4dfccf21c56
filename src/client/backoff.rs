//! The reconnect policy: exponential backoff with a cap and jitter.

use std::time::Duration;

use rand::Rng;

/// How the client waits between connection attempts after a connection is lost (or the first
/// one fails).
///
/// Attempt `n` (1 for the first retry) waits up to `initial_delay * multiplier^(n-1)`, capped at
/// `max_delay`, then [`Jitter`] spreads that, so a thousand clients dropped by one server restart
/// do not all come back in the same millisecond. The count starts again at 1 after each
/// connection that got as far as the server's `welcome`.
///
/// ```
/// use std::time::Duration;
/// use roomcast::client::{Jitter, ReconnectPolicy};
///
/// let policy = ReconnectPolicy {
///     initial_delay: Duration::from_millis(100),
///     max_delay: Duration::from_secs(5),
///     jitter: Jitter::None,
///     ..ReconnectPolicy::default()
/// };
/// assert_eq!(policy.base_delay(1), Duration::from_millis(100));
/// assert_eq!(policy.base_delay(4), Duration::from_millis(800));
/// assert_eq!(policy.base_delay(30), Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// The wait before the first retry (before jitter). Default 500 ms.
    pub initial_delay: Duration,
    /// No wait is longer than this (before jitter). Default 30 s.
    pub max_delay: Duration,
    /// Each retry waits this many times longer than the one before. Default 2. Values below 1
    /// (or not finite) count as 1.
    pub multiplier: f64,
    /// How the wait is randomized. Default [`Jitter::Full`].
    pub jitter: Jitter,
    /// Retries in a row after which the client gives up and its event stream ends; `None`
    /// (the default) retries for ever, `Some(0)` never retries.
    pub max_attempts: Option<u32>,
}

/// How a reconnect delay is randomized ("Exponential Backoff And Jitter", AWS architecture
/// blog, 2015).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the computed delay.
    None,
    /// Uniform between zero and the computed delay: spreads a crowd the most.
    Full,
    /// Half the computed delay plus uniform up to the other half.
    Equal,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: Jitter::Full,
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// A policy that never reconnects: the first lost (or failed) connection ends the client.
    pub fn never() -> Self {
        Self {
            max_attempts: Some(0),
            ..Self::default()
        }
    }

    /// The wait before attempt `attempt` (1-based), before jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let multiplier = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let cap = self.max_delay.as_secs_f64();
        let secs = self.initial_delay.as_secs_f64() * multiplier.powi(exponent);
        if secs.is_finite() && secs < cap {
            Duration::from_secs_f64(secs)
        } else {
            self.max_delay
        }
    }

    /// The wait before attempt `attempt` (1-based), jitter applied.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let base = self.base_delay(attempt);
        match self.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(rng.gen_range(0.0..=1.0)),
            Jitter::Equal => base / 2 + (base / 2).mul_f64(rng.gen_range(0.0..=1.0)),
        }
    }

    /// Whether attempt `attempt` (1-based) may be made.
    pub fn allows(&self, attempt: u32) -> bool {
        self.max_attempts.map_or(true, |max| attempt <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_delay_grows_by_the_multiplier_up_to_the_cap() {
        let policy = ReconnectPolicy {
            jitter: Jitter::None,
            ..ReconnectPolicy::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let delays: Vec<u64> = (1..=9)
            .map(|n| policy.delay(n, &mut rng).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        // Huge attempt numbers neither overflow nor panic.
        assert_eq!(policy.base_delay(u32::MAX), Duration::from_secs(30));
        assert_eq!(policy.base_delay(0), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_its_range_and_varies() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for jitter in [Jitter::Full, Jitter::Equal] {
            let policy = ReconnectPolicy {
                jitter,
                ..ReconnectPolicy::default()
            };
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..200 {
                let delay = policy.delay(3, &mut rng);
                assert!(delay <= Duration::from_secs(2), "{jitter:?} {delay:?}");
                if jitter == Jitter::Equal {
                    assert!(delay >= Duration::from_secs(1), "{delay:?}");
                }
                seen.insert(delay.as_millis());
            }
            assert!(seen.len() > 50, "{jitter:?} spreads the delays");
        }
    }

    #[test]
    fn odd_multipliers_and_caps_are_safe() {
        for multiplier in [0.0, -3.0, f64::NAN, f64::INFINITY, 0.5] {
            let policy = ReconnectPolicy {
                multiplier,
                jitter: Jitter::None,
                ..ReconnectPolicy::default()
            };
            let delay = policy.base_delay(10);
            assert!(
                delay == Duration::from_millis(500) || delay == Duration::from_secs(30),
                "{multiplier}: {delay:?}"
            );
        }
        let capped_below = ReconnectPolicy {
            initial_delay: Duration::from_secs(10),
            max_delay: Duration::from_secs(1),
            ..ReconnectPolicy::default()
        };
        assert_eq!(capped_below.base_delay(1), Duration::from_secs(1));
    }

    #[test]
    fn max_attempts_limits_retries() {
        assert!(ReconnectPolicy::default().allows(1_000_000));
        assert!(!ReconnectPolicy::never().allows(1));
        let three = ReconnectPolicy {
            max_attempts: Some(3),
            ..ReconnectPolicy::default()
        };
        assert!(three.allows(3) && !three.allows(4));
    }
}
