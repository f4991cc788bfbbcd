//! The pidfile: written atomically, held with `flock` for the master's whole life.
//!
//! The lock, not the file's existence, says whether a master is running: a file left by a dead
//! master is unlocked and is taken over; a locked one makes a second master refuse to start.
//! The pid is written to a temporary file that is locked and then renamed over the path, so a
//! reader never sees a partial pid. After taking a lock the inode is compared with the path's,
//! since another master may have renamed a new file over it in the meantime.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

#[derive(Debug, thiserror::Error)]
pub enum PidfileError {
    #[error("pidfile {path}: another presup master{} holds it", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("pidfile {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pidfile {path}: its directory {} does not exist (create it, or use systemd's RuntimeDirectory=)", .path.parent().unwrap_or(std::path::Path::new("/")).display())]
    NoDirectory { path: PathBuf },
}

/// A held pidfile; removed by [`Pidfile::remove`] (or on drop).
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    lock: Option<Flock<File>>,
}

impl Pidfile {
    /// Takes the pidfile at `path` for this process.
    pub fn acquire(path: &Path) -> Result<Pidfile, PidfileError> {
        let io_err = |source: io::Error| PidfileError::Io { path: path.to_path_buf(), source };
        if path.parent().is_some_and(|d| !d.as_os_str().is_empty() && !d.is_dir()) {
            return Err(PidfileError::NoDirectory { path: path.to_path_buf() });
        }
        // Lock whatever is at the path now, so that a live master is detected.
        let existing = lock_path(path).map_err(io_err)?;
        let Some(existing) = existing else {
            return Err(PidfileError::Held { path: path.to_path_buf(), holder: read_pid(path) });
        };
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let result = write_locked(&tmp, path);
        drop(existing);
        let lock = result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(e)
        })?;
        Ok(Pidfile { path: path.to_path_buf(), lock: Some(lock) })
    }

    /// Removes the file if it is still ours, and releases the lock.
    pub fn remove(&mut self) {
        if let Some(lock) = self.lock.take() {
            if same_file(&lock, &self.path) {
                let _ = std::fs::remove_file(&self.path);
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

/// Opens (creating if needed) and locks the file at `path`; `None` if someone holds it.
fn lock_path(path: &Path) -> io::Result<Option<Flock<File>>> {
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(e.into()),
        };
        // Renamed over while we waited for the lock: lock the new file instead.
        if same_file(&lock, path) {
            return Ok(Some(lock));
        }
    }
}

/// Writes our pid to `tmp`, locks it and renames it to `path`.
fn write_locked(tmp: &Path, path: &Path) -> io::Result<Flock<File>> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(tmp)?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()?;
    let lock =
        Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| io::Error::from(e))?;
    std::fs::rename(tmp, path)?;
    Ok(lock)
}

fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
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
        assert_eq!(read_pid(&path), Some(std::process::id()));
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
