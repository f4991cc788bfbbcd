//! A directory the master makes files in (the pidfile's, a ticket `path`'s): opened once, and
//! every file in it reached relative to it (`openat`, `renameat`, `unlinkat`), never through a
//! symlink in the last component (`O_NOFOLLOW`), temporaries made only if new (`O_EXCL`).
//!
//! A master running as root refuses a directory others could plant files in ([`unsafe_mode`]),
//! like sshd's `StrictModes`: one writable by group or others, unless it is sticky and root's
//! (like `/tmp`: others may add files, but cannot remove or rename the master's, and their
//! symlinks are not followed). A directory owned by another, unprivileged user (systemd's
//! `RuntimeDirectory=` with `User=`) is accepted: that user is trusted with what is in it, and
//! what they could plant there (a symlink, a FIFO) is refused rather than followed.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

/// An open directory.
#[derive(Debug)]
pub struct Directory {
    fd: OwnedFd,
    path: PathBuf,
}

impl Directory {
    /// Opens the directory of `file` (`.` for a bare name); returns it and `file`'s name.
    pub fn of(file: &Path) -> io::Result<(Directory, OsString)> {
        let name = file.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the path does not name a file")
        })?;
        let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Ok((Directory::open(dir)?, name.to_os_string()))
    }

    pub fn open(path: &Path) -> io::Result<Directory> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::open(path, flags, Mode::empty())?;
        Ok(Directory { fd, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why a master running as root must not make files here (see [`unsafe_mode`]).
    pub fn unsafe_for_root(&self) -> io::Result<Option<String>> {
        let meta = File::from(self.fd.try_clone()?).metadata()?;
        Ok(unsafe_mode(meta.mode(), meta.uid()).map(|why| {
            let fix = if meta.mode() & 0o020 != 0 { "go-w" } else { "o-w" };
            format!(
                "its directory {} is {why} while presup runs as root; refusing it (chmod {fix} {0}, \
                 or use a directory only root can write)",
                self.path.display()
            )
        }))
    }

    /// Opens `name` read-write, creating it (with `mode`) if `create`; refuses a symlink or
    /// anything but a regular file.
    pub fn open_file(&self, name: &OsString, create: bool, mode: u32) -> io::Result<File> {
        let create = if create { OFlag::O_CREAT } else { OFlag::empty() };
        self.open_at(name, OFlag::O_RDWR | create, mode)
    }

    /// Opens `name` for reading; refuses a symlink or anything but a regular file.
    pub fn open_read(&self, name: &OsString) -> io::Result<File> {
        self.open_at(name, OFlag::O_RDONLY, 0)
    }

    /// Creates `name`, which must not exist (not even as a symlink), read-write with `mode`.
    pub fn create_new(&self, name: &OsString, mode: u32) -> io::Result<File> {
        self.open_at(name, OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL, mode)
    }

    fn open_at(&self, name: &OsString, flags: OFlag, mode: u32) -> io::Result<File> {
        // O_NONBLOCK: opening a FIFO planted there must not block the master.
        let flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        let fd =
            nix::fcntl::openat(&self.fd, name.as_os_str(), flags, Mode::from_bits_truncate(mode))
                .map_err(|e| match e {
                Errno::ELOOP => {
                    io::Error::other("a symbolic link, which presup does not follow (remove it)")
                }
                e => e.into(),
            })?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file (remove it)"));
        }
        // Back to blocking I/O: O_NONBLOCK means nothing for a regular file anyway.
        nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
        Ok(file)
    }

    /// Renames `from` to `to`, both in this directory (`to` replaced, never followed).
    pub fn rename(&self, from: &OsString, to: &OsString) -> io::Result<()> {
        Ok(nix::fcntl::renameat(&self.fd, from.as_os_str(), &self.fd, to.as_os_str())?)
    }

    /// Removes the file `name` (a symlink itself, never its target).
    pub fn remove(&self, name: &OsString) -> io::Result<()> {
        Ok(nix::unistd::unlinkat(&self.fd, name.as_os_str(), UnlinkatFlags::NoRemoveDir)?)
    }

    /// Whether `name` is `file` (not a symlink to it).
    pub fn holds(&self, name: &OsString, file: &File) -> bool {
        let at = nix::sys::stat::fstatat(&self.fd, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW);
        match (at, file.metadata()) {
            (Ok(a), Ok(b)) => a.st_ino == b.ino() && a.st_dev == b.dev(),
            _ => false,
        }
    }
}

/// Why a directory of `mode` owned by `uid` lets others plant files where a root master makes
/// its own: writable by group or others, unless sticky and root's. `None`: safe.
pub fn unsafe_mode(mode: u32, uid: u32) -> Option<String> {
    let sticky_root = mode & 0o1000 != 0 && uid == 0;
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        _ if sticky_root => return None,
        (false, false) => return None,
        (true, false) => "group",
        (false, true) => "others",
        (true, true) => "group and others",
    };
    Some(format!("writable by {who} (mode {:04o})", mode & 0o7777))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_others_can_write_is_unsafe_unless_sticky_and_roots() {
        assert_eq!(unsafe_mode(0o40755, 0), None);
        assert_eq!(unsafe_mode(0o40700, 1000), None, "a delegated directory");
        assert_eq!(unsafe_mode(0o41777, 0), None, "/tmp");
        assert_eq!(unsafe_mode(0o40777, 0).unwrap(), "writable by group and others (mode 0777)");
        assert_eq!(unsafe_mode(0o40775, 0).unwrap(), "writable by group (mode 0775)");
        assert_eq!(unsafe_mode(0o40757, 0).unwrap(), "writable by others (mode 0757)");
        assert!(unsafe_mode(0o41777, 1000).is_some(), "sticky, but its owner removes anything");
    }

    #[test]
    fn symlinks_and_fifos_are_refused_temporaries_are_new() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Directory::open(tmp.path()).unwrap();
        let target = tmp.path().join("target");
        std::os::unix::fs::symlink(&target, tmp.path().join("link")).unwrap();
        let err = dir.open_file(&"link".into(), true, 0o644).unwrap_err();
        assert!(err.to_string().contains("a symbolic link, which presup does not follow"), "{err}");
        assert!(dir.create_new(&"link".into(), 0o644).is_err());
        assert!(!target.exists());
        nix::unistd::mkfifo(&tmp.path().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let err = dir.open_file(&"fifo".into(), false, 0).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let f = dir.create_new(&"new".into(), 0o600).unwrap();
        assert!(dir.holds(&"new".into(), &f) && !dir.holds(&"link".into(), &f));
        dir.rename(&"new".into(), &"link".into()).unwrap();
        assert!(dir.holds(&"link".into(), &f) && !target.exists());
        dir.remove(&"link".into()).unwrap();
        assert!(!tmp.path().join("link").exists());
    }
}
