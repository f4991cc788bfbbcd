//! Making a ticket's file: fresh in the master's private runtime directory, or at the ticket's
//! `path`, where the grants of a previous master of the same boot are kept.
//!
//! A state file is held with a shared `flock` by every master using it. A master that gets it
//! exclusively may rewrite it (a new boot, new sizes); it writes the new state to a temporary
//! file and renames it over, so no process ever maps a half-written header. A master that
//! finds another one holding the file joins it only if the file is of this boot and has the
//! same sizes and rules. Whenever the file it locked (or turned from exclusive to shared) is no
//! longer the one at the path, another master replaced it meanwhile: it starts again with the
//! file now there ([`crate::lockfile`]), so that two masters never use two files.
//!
//! When the sizes or rules changed, what is known of the last grants is carried over so that
//! no grant comes sooner than both the old and the new rules allow ([`carry_over`]).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use nix::fcntl::{Flock, FlockArg};

use super::layout::{Mapping, Params};
use crate::directory::Directory;
use crate::lockfile::{self, Hold, IfHeld};

/// What was found at a state file's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing (or an empty file): a fresh ticket.
    Nothing,
    /// The grants of this boot, kept as they are.
    Kept,
    /// A state from another boot: CLOCK_MONOTONIC started again, so it means nothing.
    OtherBoot,
    /// This boot's state with other sizes or rules, carried over.
    CarriedOver { from: Params },
}

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("{0}")]
    Refused(String),
}

/// `/proc/sys/kernel/random/boot_id` as two words (zeros if it cannot be read).
pub fn boot_id() -> [u64; 2] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    parse_boot_id(&text).unwrap_or([0, 0])
}

pub fn parse_boot_id(text: &str) -> Option<[u64; 2]> {
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    Some([u64::from_str_radix(&hex[..16], 16).ok()?, u64::from_str_radix(&hex[16..], 16).ok()?])
}

/// Creates a new ticket file at `path` (which must not exist), mode 0600.
/// On any error the file is removed again.
pub fn create(path: &Path, p: &Params, boot: [u64; 2]) -> io::Result<File> {
    let f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(path)?;
    if let Err(e) = write_state(&f, &State::fresh(*p), boot) {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(f)
}

/// Opens or makes the state file at `path` for a ticket with params `p`; the returned file
/// holds a shared `flock` for as long as it is open. Nothing is opened through a symlink at
/// `path`, and, as root, a directory others can write is refused ([`crate::directory`]).
pub fn persistent(
    path: &Path,
    p: &Params,
    boot: [u64; 2],
) -> Result<(Flock<File>, Found), FileError> {
    let (dir, name) = Directory::of(path)?;
    if nix::unistd::geteuid().is_root() {
        if let Some(why) = dir.unsafe_for_root()? {
            return Err(FileError::Refused(why));
        }
    }
    loop {
        if let Some(held) = attempt(&dir, &name, p, boot)? {
            return Ok(held);
        }
    }
}

/// One try of [`persistent`]: locks the file at `name` (exclusively if no other master holds
/// it), checks it and, held exclusively, rewrites it if it must. `None`: the file at the path
/// was replaced while its exclusive lock turned shared ([`lockfile::share`]); the lock held is
/// on a file no other master opens, so the caller tries again with the file now there.
fn attempt(
    dir: &Directory,
    name: &OsString,
    p: &Params,
    boot: [u64; 2],
) -> Result<Option<(Flock<File>, Found)>, FileError> {
    let Some((lock, hold)) = lockfile::lock(dir, name, 0o600, IfHeld::Share)? else {
        unreachable!("a state file held by another master is shared, never given up on");
    };
    let found = inspect(&lock, p, boot)?;
    if found == Found::Kept {
        let shared = match hold {
            Hold::Shared => Some(lock),
            Hold::Exclusive => lockfile::share(dir, name, lock)?,
        };
        return Ok(shared.map(|lock| (lock, found)));
    }
    if hold == Hold::Shared {
        return Err(FileError::Refused(format!(
            "another presup uses this state file with other settings ({found:?}); stop it, or \
             give this ticket another path"
        )));
    }
    let state = match &found {
        Found::CarriedOver { .. } => {
            carry_over(&read_state(&lock)?, p).map_err(FileError::Refused)?
        }
        _ => State::fresh(*p),
    };
    // Write beside it, then rename over it: a process that has the old file mapped keeps a
    // consistent (old) file, and none maps a half-written one.
    let mut tmp = name.clone();
    tmp.push(format!(".new-{}", std::process::id()));
    let _ = dir.remove(&tmp);
    let f = dir.create_new(&tmp, 0o600)?;
    // From here on, every way out but the rename removes the temporary file.
    let written = Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, e)| io::Error::from(e))
        .and_then(|new| {
            write_state(&new, &state, boot)?;
            dir.rename(&tmp, name)?;
            Ok(new)
        });
    let new = written.inspect_err(|_| {
        let _ = dir.remove(&tmp);
        // An empty file held exclusively is the one `lockfile::lock` made (or nothing): gone too.
        if found == Found::Nothing && dir.holds(name, &lock) {
            let _ = dir.remove(name);
        }
    })?;
    Ok(lockfile::share(dir, name, new)?.map(|new| (new, found)))
}

fn inspect(f: &File, p: &Params, boot: [u64; 2]) -> Result<Found, FileError> {
    if f.metadata()?.len() == 0 {
        return Ok(Found::Nothing);
    }
    let mapping = Mapping::map(f).map_err(|e| {
        FileError::Refused(format!(
            "{e}; it is not a state file this presup can read: remove it to start afresh"
        ))
    })?;
    let h = mapping.header();
    Ok(match () {
        _ if h.boot_id() != boot || boot == [0, 0] => Found::OtherBoot,
        _ if h.params() == *p => Found::Kept,
        _ => Found::CarriedOver { from: h.params() },
    })
}

/// A ticket's words, off the mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub params: Params,
    pub slots: Vec<u64>,
    pub ring: Vec<u64>,
    pub reservations: u64,
}

impl State {
    pub fn fresh(params: Params) -> State {
        State {
            params,
            slots: vec![0; params.buckets as usize],
            ring: vec![0; params.daily_limit as usize],
            reservations: 0,
        }
    }
}

fn read_state(f: &File) -> io::Result<State> {
    let m = Mapping::map(f)?;
    let v = m.view();
    let load = |words: &[AtomicU64]| words.iter().map(|w| w.load(Relaxed)).collect();
    Ok(State {
        params: v.header.params(),
        slots: load(v.slots),
        ring: load(v.ring),
        reservations: v.header.reservations.load(Relaxed),
    })
}

fn write_state(f: &File, s: &State, boot: [u64; 2]) -> io::Result<()> {
    let m = Mapping::map_new(f, &s.params)?;
    let v = m.view();
    for (w, value) in v.slots.iter().zip(&s.slots).chain(v.ring.iter().zip(&s.ring)) {
        w.store(*value, Relaxed);
    }
    v.header.reservations.store(s.reservations, Relaxed);
    // The magic last: the file is a ticket only once complete.
    v.header.init(&s.params, boot);
    Ok(())
}

/// The state of a ticket with params `new`, made from `old`'s so that no grant comes sooner
/// than what was granted under the old rules allows under the new ones.
///
/// - Buckets: with the same bucket count, each bucket's last grant is kept (its next free
///   instant moves by the change of interval); with another count, every bucket's next free
///   instant is the newest grant of any bucket plus the new interval.
/// - Daily: the old ring's chains hold the last grant of each chain, and any older grant of a
///   chain is at least the old period before its last one. The new ring keeps the newest
///   `min(old, new)` chain ends; a larger limit adds chains that start after the newest grant
///   (or empty ones, when every old grant is in the ring). With a period no longer than the
///   old one, a window of the new period then holds at most one grant, old or new, per new
///   chain. A longer period, or a limit where there was none, cannot be proved from what the
///   file holds: refused.
pub fn carry_over(old: &State, new: &Params) -> Result<State, String> {
    let o = &old.params;
    let last = |slot: u64| if slot == 0 { 0 } else { slot.saturating_sub(o.interval_ns) };
    let newest_slot = old.slots.iter().map(|&s| last(s)).max().unwrap_or(0);
    let newest_ring = old.ring.iter().copied().max().unwrap_or(0);
    let newest = newest_slot.max(newest_ring);
    let next = |grant: u64| if grant == 0 { 0 } else { grant.saturating_add(new.interval_ns) };
    let slots = if o.buckets == new.buckets {
        old.slots.iter().map(|&s| next(last(s))).collect()
    } else {
        vec![next(newest); new.buckets as usize]
    };
    let ring = match (o.daily(), new.daily()) {
        (_, false) => vec![],
        (false, true) => {
            return Err(format!(
                "the state file has no record of the grants a new daily_limit of {} must count; \
                 remove it to start with an empty record",
                new.daily_limit
            ))
        }
        (true, true) if new.daily_period_ns > o.daily_period_ns => {
            return Err(format!(
                "daily_period grew from {:?} to {:?}: the state file cannot tell how many grants \
                 the longer window holds; remove it to start with an empty record",
                std::time::Duration::from_nanos(o.daily_period_ns),
                std::time::Duration::from_nanos(new.daily_period_ns)
            ))
        }
        (true, true) => {
            let mut ends: Vec<u64> = old.ring.iter().copied().filter(|&g| g != 0).collect();
            ends.sort_unstable_by(|a, b| b.cmp(a));
            ends.truncate(new.daily_limit as usize);
            // While the ring was not yet full every old grant is in it: new chains start empty.
            let all_known = old.reservations < o.daily_limit;
            let pad = if all_known { 0 } else { newest_ring };
            ends.resize(new.daily_limit as usize, pad);
            // The cursor starts at 0: put the oldest chain end (the first usable) there.
            ends.sort_unstable();
            ends
        }
    };
    Ok(State { params: *new, slots, ring, reservations: 0 })
}

#[cfg(test)]
pub(super) mod test_support {
    pub use super::{carry_over, parse_boot_id, State};
}
