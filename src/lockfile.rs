//! A file held with `flock(2)` at a path in a [`Directory`]: the pidfile, a ticket's state
//! file.
//!
//! A lock is taken on an open file, but what other processes look at is the file at the path,
//! and another process may rename a new file over the path between the open and the lock (or
//! while this one waits for it): the lock would then be on a file nobody else will open. So
//! after every lock the file's inode is compared with the path's ([`Directory::holds`]), and on
//! a mismatch the file now at the path is opened and locked instead. Turning an exclusive lock
//! into a shared one has the same gap: `flock` is not atomic there (it drops the exclusive lock
//! before it takes the shared one), and another process may take the file exclusively in
//! between and replace it; [`share`] says so, and the caller starts again.

use std::ffi::OsString;
use std::fs::File;
use std::io;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::directory::Directory;

/// How a file is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// By this process alone.
    Exclusive,
    /// With other processes, none of which holds it exclusively.
    Shared,
}

/// What [`lock`] does when another process holds the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfHeld {
    /// Gives up at once: `None`.
    GiveUp,
    /// Waits for a shared lock (until an exclusive holder lets go).
    Share,
}

/// Opens `name` in `dir` (creating it with `mode` if missing) and locks it exclusively
/// without waiting, or, if another process holds it, as `if_held` says. Once it returns, the
/// locked file is the one at the path.
pub fn lock(
    dir: &Directory,
    name: &OsString,
    mode: u32,
    if_held: IfHeld,
) -> io::Result<Option<(Flock<File>, Hold)>> {
    lock_with(dir, name, mode, |file| take(file, if_held))
}

/// One lock of an open file, as [`lock`] takes it.
fn take(file: File, if_held: IfHeld) -> io::Result<Option<(Flock<File>, Hold)>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some((lock, Hold::Exclusive))),
        Err((_, Errno::EWOULDBLOCK)) if if_held == IfHeld::GiveUp => Ok(None),
        Err((file, Errno::EWOULDBLOCK)) => {
            let lock =
                Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?;
            Ok(Some((lock, Hold::Shared)))
        }
        Err((_, e)) => Err(e.into()),
    }
}

/// [`lock`], with the step that locks an open file given (a test replaces the file there).
fn lock_with(
    dir: &Directory,
    name: &OsString,
    mode: u32,
    mut take: impl FnMut(File) -> io::Result<Option<(Flock<File>, Hold)>>,
) -> io::Result<Option<(Flock<File>, Hold)>> {
    loop {
        let file = dir.open_file(name, true, mode)?;
        let Some((lock, hold)) = take(file)? else { return Ok(None) };
        // Renamed over (or removed) while we opened and locked it: lock the new file instead.
        if dir.holds(name, &lock) {
            return Ok(Some((lock, hold)));
        }
    }
}

/// Turns the exclusive `lock` on the file at `name` into a shared one. `None` if, in the gap
/// `flock` leaves, another process took the file and put another at the path: the lock is on
/// a file nobody else will open, and the caller starts again from [`lock`].
pub fn share(
    dir: &Directory,
    name: &OsString,
    lock: Flock<File>,
) -> io::Result<Option<Flock<File>>> {
    share_with(dir, name, lock, |l| l.relock(FlockArg::LockShared))
}

/// [`share`], with the relock given (a test replaces the file there).
fn share_with(
    dir: &Directory,
    name: &OsString,
    lock: Flock<File>,
    relock: impl FnOnce(&Flock<File>) -> nix::Result<()>,
) -> io::Result<Option<Flock<File>>> {
    relock(&lock)?;
    Ok(dir.holds(name, &lock).then_some(lock))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Directory, OsString) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Directory::open(tmp.path()).unwrap();
        (tmp, dir, OsString::from("held"))
    }

    /// Another process's move: a new file renamed over `name`.
    fn replace(tmp: &tempfile::TempDir, name: &OsString) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let new = tmp.path().join("new");
        std::fs::write(&new, "").unwrap();
        let ino = std::fs::metadata(&new).unwrap().ino();
        std::fs::rename(&new, tmp.path().join(name)).unwrap();
        ino
    }

    fn ino(lock: &Flock<File>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        lock.metadata().unwrap().ino()
    }

    /// Whether another open file description can take the file at `name` with `arg`.
    fn can_lock(dir: &Directory, name: &OsString, arg: FlockArg) -> bool {
        Flock::lock(dir.open_file(name, false, 0).unwrap(), arg).is_ok()
    }

    #[test]
    fn a_file_renamed_over_the_path_while_it_is_locked_is_noticed_and_the_new_one_locked() {
        let (tmp, dir, name) = setup();
        let mut calls = 0;
        let mut new_ino = 0;
        let held = lock_with(&dir, &name, 0o600, |file| {
            calls += 1;
            let held = take(file, IfHeld::GiveUp);
            if calls == 1 {
                new_ino = replace(&tmp, &name);
            }
            held
        });
        let (lock, hold) = held.unwrap().expect("nobody else holds it");
        assert_eq!((calls, hold), (2, Hold::Exclusive));
        assert_eq!(ino(&lock), new_ino, "the lock is on the file at the path");
        assert!(dir.holds(&name, &lock));
        assert!(!can_lock(&dir, &name, FlockArg::LockSharedNonblock));
    }

    #[test]
    fn a_held_file_is_given_up_on_or_shared() {
        let (_tmp, dir, name) = setup();
        let (first, _) = lock(&dir, &name, 0o600, IfHeld::GiveUp).unwrap().unwrap();
        assert!(lock(&dir, &name, 0o600, IfHeld::GiveUp).unwrap().is_none());
        let first = share(&dir, &name, first).unwrap().expect("not replaced");
        let (second, hold) = lock(&dir, &name, 0o600, IfHeld::Share).unwrap().unwrap();
        assert_eq!(hold, Hold::Shared);
        assert!(!can_lock(&dir, &name, FlockArg::LockExclusiveNonblock));
        drop((first, second));
        assert!(can_lock(&dir, &name, FlockArg::LockExclusiveNonblock));
    }

    #[test]
    fn a_file_replaced_while_an_exclusive_lock_turns_shared_is_reported() {
        let (tmp, dir, name) = setup();
        let (held, _) = lock(&dir, &name, 0o600, IfHeld::GiveUp).unwrap().unwrap();
        let shared = share_with(&dir, &name, held, |l| {
            // What another master may do in flock's gap: take the file, rename a new one over.
            replace(&tmp, &name);
            l.relock(FlockArg::LockShared)
        });
        assert!(shared.unwrap().is_none(), "the lock on the replaced file was kept");
        // Starting again locks the file at the path.
        let (again, _) = lock(&dir, &name, 0o600, IfHeld::Share).unwrap().unwrap();
        assert!(dir.holds(&name, &again));
    }
}
