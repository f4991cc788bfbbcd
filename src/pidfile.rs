//! The pidfile: written atomically, held with `flock` for the master's whole life.
//!
//! The lock, not the file's existence, says whether a master is running: a file left by a dead
//! master is unlocked and is taken over; a locked one makes a second master refuse to start.
//! The pid is written to a temporary file that is locked and then renamed over the path, so a
//! reader never sees a partial pid. After taking a lock the inode is compared with the path's,
//! since another master may have renamed a new file over it in the meantime
//! ([`crate::lockfile`]). Every file is reached through its directory's fd, never through a
//! symlink ([`crate::directory`]).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::directory::Directory;
use crate::lockfile::{self, IfHeld};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {path}: another presup master{} holds it", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("pidfile {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pidfile {path}: its directory {} does not exist (create it, or use systemd's RuntimeDirectory=)", .path.parent().unwrap_or(std::path::Path::new("/")).display())]
    NoDirectory { path: PathBuf },
    #[error("pidfile {path}: {why}")]
    Unsafe { path: PathBuf, why: String },
}

/// A held pidfile; removed by [`Pidfile::remove`] (or on drop).
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl Pidfile {
    /// Takes the pidfile at `path` for this process. Nothing is opened through a symlink at
    /// `path`, and, as root, a directory others can write is refused ([`crate::directory`]).
    pub fn acquire(path: &Path) -> Result<Pidfile, PidfileError> {
        let io_err = |source: io::Error| PidfileError::Io { path: path.to_path_buf(), source };
        let (dir, name) = Directory::of(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => {
                PidfileError::NoDirectory { path: path.to_path_buf() }
            }
            _ => io_err(e),
        })?;
        if nix::unistd::geteuid().is_root() {
            if let Some(why) = dir.unsafe_for_root().map_err(io_err)? {
                return Err(PidfileError::Unsafe { path: path.to_path_buf(), why });
            }
        }
        // Lock whatever is at the path now, so that a live master is detected.
        let existing = lock_path(&dir, &name).map_err(io_err)?;
        let Some(existing) = existing else {
            return Err(PidfileError::Held {
                path: path.to_path_buf(),
                holder: read_pid(&dir, &name),
            });
        };
        let tmp: OsString =
            Path::new(&name).with_extension(format!("tmp.{}", std::process::id())).into();
        let result = write_locked(&dir, &tmp, &name);
        drop(existing);
        let lock = result.map_err(|e| {
            let _ = dir.remove(&tmp);
            io_err(e)
        })?;
        Ok(Pidfile { path: path.to_path_buf(), lock: Some(lock) })
    }

    /// Removes the file if it is still ours, and releases the lock.
    pub fn remove(&mut self) {
        if let Some(lock) = self.lock.take() {
            if let Ok((dir, name)) = Directory::of(&self.path) {
                if dir.holds(&name, &lock) {
                    let _ = dir.remove(&name);
                }
            }
        }
    }

    /// The locked file's fd (a forked worker closes it: the lock is the master's).
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.lock.as_ref().map(|l| l.as_raw_fd())
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Opens (creating if needed) and locks the file `name`; `None` if someone holds it.
fn lock_path(dir: &Directory, name: &OsString) -> io::Result<Option<Flock<File>>> {
    let held = lockfile::lock(dir, name, 0o644, IfHeld::GiveUp)?;
    Ok(held.map(|(lock, _)| lock))
}

/// Writes our pid to the new file `tmp`, locks it and renames it to `name`.
fn write_locked(dir: &Directory, tmp: &OsString, name: &OsString) -> io::Result<Flock<File>> {
    let mut file = dir.create_new(tmp, 0o644)?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))?;
    dir.rename(tmp, name)?;
    Ok(lock)
}

fn read_pid(dir: &Directory, name: &OsString) -> Option<u32> {
    let mut s = String::new();
    dir.open_read(name).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_refused_stale_file_taken_over_removed_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("presup.pid");
        std::fs::write(&path, "999999\n").unwrap(); // stale: nobody holds a lock on it
        let mut first = Pidfile::acquire(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{}\n", std::process::id()));
        let err = Pidfile::acquire(&path).unwrap_err();
        assert!(
            matches!(err, PidfileError::Held { holder: Some(p), .. } if p == std::process::id())
        );
        first.remove();
        assert!(!path.exists());
        let again = Pidfile::acquire(&path).unwrap();
        drop(again);
        assert!(!path.exists());
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let err = Pidfile::acquire(Path::new("/nonexistent-presup-dir/x.pid")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-presup-dir/x.pid"), "{err}");
    }
}
