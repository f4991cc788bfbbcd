//! The ticket: a rate limiter in shared memory that every child reaches.
//!
//! One file per `[tickets.NAME]`, created by the master before any child (in its private
//! runtime directory, or at the ticket's `path` so that its grants survive a restart of the
//! master) and mapped shared by every process that takes a turn. Its path is in
//! `PRESUP_TICKET_<NAME>`, so that a process started by a child, even one whose inherited fds
//! were closed, reaches it too. The layout is in [`layout`], the rules in [`reserve`]:
//!
//! - for each bucket (`shard % buckets`), never two grants closer than `interval + margin`,
//!   whatever the number of processes; grants in the order they were reserved (the margin
//!   absorbs the callers' wake-up jitter, see [`default_margin`]);
//! - with `daily_limit`, never more than that many grants in any window of `daily_period`:
//!   past it a caller waits (never fails, never gets an extra turn);
//! - time is CLOCK_MONOTONIC, which every process of the host shares;
//! - a process killed at any point breaks nothing for the others (at worst its own turn passes
//!   unused).
//!
//! Three ways in: this module (`Ticket::from_env("identify")?.acquire(shard)`), the CLI
//! (`presup ticket NAME --shard N`), and, when `http` is set, the [`server`] singleton that
//! speaks twilight gateway-queue's protocol. [`Tickets`] is the master's side.

pub mod cli;
mod file;
mod layout;
mod reserve;
pub mod server;
mod set;
#[cfg(test)]
mod tests;
#[cfg(any(feature = "twilight-0.17", feature = "twilight-0.18"))]
pub mod twilight;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::time::{clock_gettime, clock_nanosleep, ClockId, ClockNanosleepFlags};

use crate::procstat::Stat;

pub use crate::config::{default_margin, MAX_BUCKETS, MAX_DAILY_LIMIT};
pub use layout::Params;
pub use reserve::{Daily, Status};
pub use set::Tickets;

/// Why a ticket cannot be used or made.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("{var} is not set: no [tickets.{name}] in the config of the presup that started this process (or an ancestor removed it from the environment)")]
    NotInEnv { name: String, var: String },
    #[error("ticket {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("ticket {name}: {why}")]
    Config { name: String, why: String },
}

/// A turn that would have come after the caller's deadline: nothing was reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the next turn is in {}, after the deadline", humantime::format_duration(Duration::from_millis(self.wait().as_millis() as u64)))]
pub struct TimedOut {
    /// When the turn would have been granted.
    pub at: Instant,
    /// When that was found out.
    pub now: Instant,
}

impl TimedOut {
    /// How long the caller would have waited.
    pub fn wait(&self) -> Duration {
        self.at.saturating_duration_since(self.now)
    }
}

/// A granted turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub bucket: u32,
    /// The instant it was granted for; the call returned at or after it.
    pub at: Instant,
    at_ns: u64,
}

impl Grant {
    /// [`Grant::at`] in ns of CLOCK_MONOTONIC (see [`now`]): comparable across processes.
    pub fn at_ns(&self) -> u64 {
        self.at_ns
    }
}

/// A reserved turn, not yet waited for: wait until [`Reservation::at`] (or call
/// [`Reservation::wait`]), or give it back with [`Ticket::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub bucket: u32,
    /// The instant of the turn.
    pub at: Instant,
    inner: reserve::Reservation,
}

impl Reservation {
    fn new(inner: reserve::Reservation) -> Reservation {
        Reservation { bucket: inner.bucket, at: instant_of(inner.at), inner }
    }

    /// [`Reservation::at`] in ns of CLOCK_MONOTONIC (see [`now`]).
    pub fn at_ns(&self) -> u64 {
        self.inner.at
    }

    /// Sleeps until the turn (at once if it has come) and returns it as granted.
    pub fn wait(&self) -> Grant {
        sleep_until(self.inner.at);
        self.grant()
    }

    fn grant(&self) -> Grant {
        Grant { bucket: self.bucket, at: self.at, at_ns: self.inner.at }
    }
}

/// The `Instant` of `ns` of CLOCK_MONOTONIC (the clock of `Instant` on Linux).
fn instant_of(ns: u64) -> Instant {
    let (instant, ns_now) = (Instant::now(), now());
    if ns >= ns_now {
        instant + Duration::from_nanos(ns - ns_now)
    } else {
        instant.checked_sub(Duration::from_nanos(ns_now - ns)).unwrap_or(instant)
    }
}

/// `at` in ns of CLOCK_MONOTONIC.
fn ns_of(at: Instant) -> u64 {
    let (instant, ns_now) = (Instant::now(), now());
    match at.checked_duration_since(instant) {
        Some(ahead) => ns_now.saturating_add(ahead.as_nanos().min(u64::MAX as u128) as u64),
        None => ns_now.saturating_sub(instant.duration_since(at).as_nanos() as u64),
    }
}

/// The environment variable that holds ticket `name`'s path: `PRESUP_TICKET_<NAME>`.
pub fn env_var(name: &str) -> String {
    format!("PRESUP_TICKET_{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// Now, in ns of CLOCK_MONOTONIC: the clock of every ticket.
pub fn now() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Sleeps until `at` (ns of CLOCK_MONOTONIC); returns at once if it is past.
pub fn sleep_until(at: u64) {
    if now() >= at {
        return; // no system call for a turn that is free now
    }
    let ts = nix::sys::time::TimeSpec::new((at / 1_000_000_000) as _, (at % 1_000_000_000) as _);
    // An absolute sleep: a signal handler that interrupts it changes nothing, just retry.
    while let Err(nix::errno::Errno::EINTR) =
        clock_nanosleep(ClockId::CLOCK_MONOTONIC, ClockNanosleepFlags::TIMER_ABSTIME, &ts)
    {}
}

/// A ticket, mapped. Clones share the mapping; it is `Send` and `Sync` (every access is an
/// atomic operation on the shared file).
#[derive(Clone)]
pub struct Ticket {
    path: PathBuf,
    mapping: Arc<layout::Mapping>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("path", &self.path).field("params", &self.params()).finish()
    }
}

impl Ticket {
    /// The ticket `name` of the presup that started this process (or an ancestor of it), from
    /// `PRESUP_TICKET_<NAME>`.
    pub fn from_env(name: &str) -> Result<Ticket, TicketError> {
        let var = env_var(name);
        match std::env::var_os(&var) {
            Some(path) => Ticket::open(Path::new(&path)),
            None => Err(TicketError::NotInEnv { name: name.to_owned(), var }),
        }
    }

    /// The ticket whose file is at `path`.
    pub fn open(path: &Path) -> Result<Ticket, TicketError> {
        let io = |source| TicketError::Io { path: path.to_path_buf(), source };
        let f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io)?;
        Ticket::from_file(path, &f)
    }

    /// The ticket in `f`, already open, whose path is `path`.
    pub(crate) fn from_file(path: &Path, f: &std::fs::File) -> Result<Ticket, TicketError> {
        let io = |source| TicketError::Io { path: path.to_path_buf(), source };
        let mapping = layout::Mapping::map(f).map_err(io)?;
        Ok(Ticket { path: path.to_path_buf(), mapping: Arc::new(mapping) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn params(&self) -> Params {
        self.mapping.header().params()
    }

    /// The bucket of `shard`: `shard % buckets`.
    pub fn bucket(&self, shard: u64) -> u32 {
        (shard % u64::from(self.params().buckets)) as u32
    }

    /// Waits for `shard`'s turn and returns it.
    pub fn acquire(&self, shard: u64) -> Grant {
        let r = self.reserve(shard, None).expect("a reservation without deadline is never refused");
        r.wait()
    }

    /// Like [`Ticket::acquire`], but gives up at once, reserving nothing, if the turn would come
    /// after `deadline`.
    pub fn acquire_until(&self, shard: u64, deadline: Instant) -> Result<Grant, TimedOut> {
        Ok(self.reserve(shard, Some(deadline))?.wait())
    }

    /// Like [`Ticket::acquire`], but gives up at once, reserving nothing, if the turn would come
    /// later than `timeout` from now.
    pub fn acquire_timeout(&self, shard: u64, timeout: Duration) -> Result<Grant, TimedOut> {
        let deadline = Instant::now().checked_add(timeout);
        match deadline {
            Some(deadline) => self.acquire_until(shard, deadline),
            None => Ok(self.acquire(shard)),
        }
    }

    /// Reserves `shard`'s next turn without waiting for it (unless it would come after
    /// `deadline`: then nothing is reserved). The caller waits until its `at` itself (an async
    /// caller with its runtime's timer), or gives the turn back with [`Ticket::cancel`].
    pub fn reserve(&self, shard: u64, deadline: Option<Instant>) -> Result<Reservation, TimedOut> {
        let bucket = self.bucket(shard);
        let view = self.mapping.view();
        let deadline = deadline.map(ns_of);
        match view.reserve(bucket, &now, deadline, &ThisProcess) {
            Ok(r) => Ok(Reservation::new(r)),
            Err(at) => Err(TimedOut { at: instant_of(at), now: Instant::now() }),
        }
    }

    /// Gives back a turn that will not be used: it goes to the next caller if nothing was
    /// reserved after it, else it passes unused. Returns whether it was given back.
    pub fn cancel(&self, r: &Reservation) -> bool {
        self.mapping.view().cancel(&r.inner, &ThisProcess)
    }

    /// The budget left and the next free instant of each bucket.
    pub fn status(&self) -> Status {
        self.mapping.view().status(now())
    }
}

/// This process as a lock holder: its pid and start time.
struct ThisProcess;

/// Linux pids are below 2^22 (`PID_MAX_LIMIT`); the start time takes the bits above.
const PID_BITS: u32 = 22;

impl reserve::Holder for ThisProcess {
    fn me(&self) -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        // Cached per pid: a forked child computes its own.
        static CACHE: AtomicU64 = AtomicU64::new(0);
        let pid = u64::from(std::process::id());
        let cached = CACHE.load(Relaxed);
        if cached != 0 && cached & ((1 << PID_BITS) - 1) == pid {
            return cached;
        }
        let word = (start_time(std::process::id()).unwrap_or(0) << PID_BITS) | pid;
        CACHE.store(word, Relaxed);
        word
    }

    fn dead(&self, word: u64) -> bool {
        let pid = (word & ((1 << PID_BITS) - 1)) as u32;
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let stat = Stat::parse(&stat);
                let zombie = !stat.is_some_and(|s| !s.gone());
                let started = stat.map(|s| s.start_time);
                let reused = word >> PID_BITS != 0 && started != Some(word >> PID_BITS);
                zombie || reused
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            // No /proc: ask the kernel whether the pid exists at all.
            Err(_) => {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
            }
        }
    }
}

/// A process's start time in clock ticks after boot (`/proc/PID/stat`, field 22).
fn start_time(pid: u32) -> Option<u64> {
    Stat::read(pid as i32).map(|s| s.start_time)
}
