//! Restart backoff: how long a slot waits before its next spawn after a child died.
//!
//! Pure arithmetic on made-up instants. The first death after a healthy run (a child that
//! stayed up for at least `reset`) restarts at once; each further death without such a run in
//! between waits `initial`, then twice that, and so on up to `max`.

use std::time::{Duration, Instant};

use crate::config;

/// The backoff state of one slot (or one singleton).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backoff {
    /// Deaths since the last healthy run.
    failures: u32,
}

impl Backoff {
    /// Records a death of a child that started at `started` and died at `now`, and returns
    /// when the next spawn may happen.
    pub fn record_death(
        &mut self,
        policy: &config::Backoff,
        started: Instant,
        now: Instant,
    ) -> Instant {
        if now.saturating_duration_since(started) >= policy.reset {
            self.failures = 0;
        }
        let delay = delay(policy, self.failures);
        self.failures = self.failures.saturating_add(1);
        now + delay
    }

    /// Deaths since the last healthy run.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// The wait before the next spawn after `failures` deaths without a healthy run in between.
pub fn delay(policy: &config::Backoff, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
    policy.initial.checked_mul(factor).unwrap_or(policy.max).min(policy.max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> config::Backoff {
        config::Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset: Duration::from_secs(10),
        }
    }

    #[test]
    fn delays_double_up_to_max() {
        let p = policy();
        let got: Vec<u64> = (0..13).map(|n| delay(&p, n).as_millis() as u64).collect();
        assert_eq!(
            got,
            [0, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(delay(&p, u32::MAX), p.max);
    }

    #[test]
    fn crash_loop_grows_then_healthy_run_resets() {
        let p = policy();
        let mut b = Backoff::default();
        let t0 = Instant::now();
        // Dies right away, three times.
        assert_eq!(b.record_death(&p, t0, t0), t0);
        let t1 = t0 + Duration::from_millis(10);
        assert_eq!(b.record_death(&p, t0, t1), t1 + Duration::from_millis(100));
        let t2 = t1 + Duration::from_millis(200);
        assert_eq!(b.record_death(&p, t1, t2), t2 + Duration::from_millis(200));
        assert_eq!(b.failures(), 3);
        // Then stays up for the reset period: the next death restarts at once.
        let t3 = t2 + Duration::from_secs(10);
        assert_eq!(b.record_death(&p, t2, t3), t3);
        assert_eq!(b.failures(), 1);
    }
}
