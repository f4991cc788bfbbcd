//! How often the master logs what children (or strangers) send it, so that a flood of
//! datagrams on the notification socket cannot become a flood of log lines.
//!
//! Pure decisions on made-up instants: [`LogLimit`] lets one line through per interval and
//! counts the rest, which the next line mentions; [`StatusLog`] is one child's `STATUS=`,
//! logged when it changes, at most once per [`STATUS_EVERY`].

use std::time::{Duration, Instant};

/// The shortest time between two logged `STATUS=` lines of one child.
pub const STATUS_EVERY: Duration = Duration::from_secs(1);

/// The shortest time between two logged rejected notifications (from processes that are not
/// children of presup), whoever sent them.
pub const REJECTED_EVERY: Duration = Duration::from_secs(10);

/// One line per `every`; the first is let through at once.
#[derive(Debug, Clone)]
pub struct LogLimit {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub fn new(every: Duration) -> LogLimit {
        LogLimit { every, last: None, suppressed: 0 }
    }

    /// Something to log at `now`: `Some(n)` if it is logged, `n` the lines held back since the
    /// last one logged; `None` if it is held back (and counted).
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|at| now.saturating_duration_since(at) < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// When the next line may be let through (none was yet: at once).
    fn next_at(&self) -> Option<Instant> {
        self.last.map(|at| at + self.every)
    }
}

/// One child's `STATUS=`: the latest, and what was last logged.
#[derive(Debug, Clone)]
pub struct StatusLog {
    pub latest: String,
    logged: Option<String>,
    limit: LogLimit,
}

impl Default for StatusLog {
    fn default() -> StatusLog {
        StatusLog { latest: String::new(), logged: None, limit: LogLimit::new(STATUS_EVERY) }
    }
}

impl StatusLog {
    /// A `STATUS=` at `now`: `Some(n)` if it is to be logged (`n` changes held back before
    /// it), `None` if it repeats the last logged one or comes too soon after it.
    pub fn update(&mut self, status: &str, now: Instant) -> Option<u64> {
        status.clone_into(&mut self.latest);
        if self.logged.as_deref() == Some(status) {
            return None;
        }
        let held_back = self.limit.admit(now)?;
        self.logged = Some(status.to_owned());
        Some(held_back)
    }

    /// When the latest status, held back, is to be logged: a child that sent "loading" then
    /// "ready" within the interval is shown "ready" once the interval is over.
    pub fn due(&self) -> Option<Instant> {
        if self.logged.as_deref() == Some(self.latest.as_str()) {
            return None;
        }
        self.limit.next_at()
    }

    /// At or after [`StatusLog::due`]: `Some(n)` if the latest status is to be logged now (`n`
    /// changes held back before it).
    pub fn flush(&mut self, now: Instant) -> Option<u64> {
        if self.due()? > now {
            return None;
        }
        let held_back = self.limit.admit(now)?;
        self.logged = Some(self.latest.clone());
        // The latest itself was counted as held back.
        Some(held_back.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_line_per_interval_and_the_next_counts_the_rest() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(ms(1000));
        assert_eq!(l.admit(t0), Some(0));
        assert_eq!(l.admit(t0 + ms(1)), None);
        assert_eq!(l.admit(t0 + ms(999)), None);
        assert_eq!(l.admit(t0 + ms(1000)), Some(2));
        assert_eq!(l.admit(t0 + ms(1500)), None);
        assert_eq!(l.admit(t0 + ms(5000)), Some(1));
        assert_eq!(l.admit(t0 + ms(6000)), Some(0));
    }

    #[test]
    fn a_status_is_logged_when_it_changes_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut s = StatusLog::default();
        assert_eq!(s.update("booting", t0), Some(0));
        // The same status again is not news, and not counted.
        assert_eq!(s.update("booting", t0 + ms(10)), None);
        assert_eq!(s.update("booting", t0 + ms(5000)), None);
        // A flood of changes: one line per second, the next one counting the others.
        let t1 = t0 + ms(6000);
        assert_eq!(s.update("1", t1), Some(0));
        assert_eq!(s.update("2", t1 + ms(1)), None);
        assert_eq!(s.update("3", t1 + ms(2)), None);
        assert_eq!(s.latest, "3");
        assert_eq!(s.update("4", t1 + STATUS_EVERY), Some(2));
        // Back to what was logged last: nothing to say.
        assert_eq!(s.update("9", t1 + ms(1500)), None);
        assert_eq!(s.update("4", t1 + ms(1600)), None);
        assert_eq!(s.latest, "4");
        assert_eq!(s.due(), None, "what was logged last is the latest");
    }

    #[test]
    fn the_last_change_of_a_burst_is_logged_once_the_interval_is_over() {
        let t0 = Instant::now();
        let mut s = StatusLog::default();
        assert_eq!(s.update("loading", t0), Some(0));
        assert_eq!(s.due(), None);
        assert_eq!(s.update("warming", t0 + ms(20)), None);
        assert_eq!(s.update("ready", t0 + ms(50)), None);
        assert_eq!(s.due(), Some(t0 + STATUS_EVERY));
        assert_eq!(s.flush(t0 + ms(999)), None);
        assert_eq!(s.flush(t0 + STATUS_EVERY), Some(1), "warming was never shown");
        assert_eq!((s.due(), s.flush(t0 + ms(5000))), (None, None));
    }
}
