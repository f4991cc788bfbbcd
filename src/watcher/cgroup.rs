//! The children's cgroup: where the master may create one, every child joins it before exec,
//! so that everything it ever starts (daemons that left its process group with `setsid`
//! included) can be killed at once through `cgroup.kill`.
//!
//! Only on the cgroup v2 hierarchy (mounted at `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` in
//! systemd's hybrid mode), as a child `presup-<pid>` of the master's own cgroup (from
//! `/proc/self/cgroup`, `0::/path`), and only when that cgroup is writable and is not a
//! systemd unit's (a `.service` or `.scope`) unless systemd delegated it (`Delegate=yes`, which
//! marks it with the `trusted.delegate` or `user.delegate` attribute): systemd owns the
//! cgroups of its units and expects nobody else to create children in them. The master itself
//! stays where it is; its new cgroup has no controllers, so cgroup v2's no-internal-processes
//! rule does not apply to the parent. `cgroup.kill` needs Linux 5.14.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::CgroupPaths;

/// A cgroup the master created for its children.
pub struct Cgroup {
    dir: PathBuf,
    /// Its `cgroup.procs`, open for writing: a child writes `0` to it to join.
    procs: OwnedFd,
    /// The directory itself, for `clone3(CLONE_INTO_CGROUP)`: a child made in it never has
    /// to move (see `crate::spawn`).
    dir_fd: OwnedFd,
}

impl Cgroup {
    /// Creates the children's cgroup, or says why there is none.
    pub fn create() -> Result<Cgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let path = own_v2_path(&own).ok_or("not on a cgroup v2 hierarchy")?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
        let (mount, root) = v2_mount(&mounts).ok_or("no cgroup2 filesystem is mounted")?;
        let rel = path.strip_prefix(&root).unwrap_or(&path).trim_start_matches('/');
        let parent = Path::new(&mount).join(rel);
        if systemd_unit(rel) && !delegated(&parent) {
            return Err(format!(
                "{} is a systemd unit's cgroup and not delegated to presup (Delegate=yes)",
                parent.display()
            ));
        }
        if !writable(&parent) {
            return Err(format!("{} is not writable", parent.display()));
        }
        sweep_stale(&parent);
        let dir = parent.join(format!("presup-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let made = Cgroup::open(dir.clone());
        if made.is_err() {
            let _ = std::fs::remove_dir(&dir);
        }
        made
    }

    fn open(dir: PathBuf) -> Result<Cgroup, String> {
        if !dir.join("cgroup.kill").exists() {
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later)".into());
        }
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| format!("{}/cgroup.procs: {e}", dir.display()))?;
        let dir_fd = std::fs::File::open(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Cgroup { dir, procs: procs.into(), dir_fd: dir_fd.into() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fd a child writes `0` to, between fork and exec, to join the cgroup.
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// The cgroup's directory, open (close-on-exec).
    pub fn dir_fd(&self) -> RawFd {
        self.dir_fd.as_raw_fd()
    }

    pub(super) fn paths(&self) -> CgroupPaths {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).unwrap_or_default();
        CgroupPaths { dir: c(&self.dir), kill: c(&self.dir.join("cgroup.kill")) }
    }

    /// Removes the cgroup as the master exits. Empty after a clean stop; one still holding
    /// processes (the master failed with children alive, or one moved in from outside) is
    /// killed first and removed once they are gone, waiting at most [`REMOVE_WAIT`] (the
    /// watcher, told to quit or already gone, does not do it).
    pub fn remove(&self) {
        if let Err(e) = kill_and_remove(&self.dir, Instant::now() + REMOVE_WAIT) {
            tracing::warn!("cannot remove the children's cgroup {}: {e}", self.dir.display());
        }
    }
}

/// How long the master's exit waits for the processes of its killed cgroup to be gone.
const REMOVE_WAIT: Duration = Duration::from_secs(1);
/// How long the master's startup waits for stale cgroups' processes to be gone.
const SWEEP_WAIT: Duration = Duration::from_millis(20);

/// Removes `dir`, a cgroup: at once if empty, else after `cgroup.kill`, retrying until
/// `until` while its killed processes are being torn down (`EBUSY`).
fn kill_and_remove(dir: &Path, until: Instant) -> std::io::Result<()> {
    let mut killed = false;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EBUSY) => return Err(e),
            Err(_) if !killed => {
                killed = true;
                std::fs::write(dir.join("cgroup.kill"), "1")?;
            }
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// The cgroups `presup-<pid>` under `parent` whose master is gone: a master and its watcher
/// both killed (`pkill -9 presup` takes both) leave theirs behind, with whatever left its
/// process group in them. Each is killed and removed, waiting at most [`SWEEP_WAIT`] in all;
/// one still busy then is logged and left to the next start. A live pid is left alone, even
/// if reused by another program: only a dead one proves the cgroup stale.
fn sweep_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let names: Vec<String> =
        entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    let until = Instant::now() + SWEEP_WAIT;
    let own = std::process::id();
    for pid in stale_candidates(&names) {
        // The master's own pid: a dead master of the same pid left it.
        let alive = pid != own
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None)
                != Err(nix::errno::Errno::ESRCH);
        if alive {
            continue;
        }
        let dir = parent.join(format!("presup-{pid}"));
        match kill_and_remove(&dir, until) {
            Ok(()) => {
                tracing::info!(path = %dir.display(), "removed the cgroup of a dead master, and killed what was left in it")
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), "cannot remove the cgroup of a dead master yet: {e}")
            }
        }
    }
}

/// The pids of the `presup-<pid>` names among `names`.
fn stale_candidates(names: &[String]) -> Vec<u32> {
    let pid = |n: &String| {
        let digits = n.strip_prefix("presup-")?;
        let canonical = digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
        canonical.then(|| digits.parse().ok()).flatten()
    };
    names.iter().filter_map(pid).collect()
}

/// The path of the process's cgroup on the v2 hierarchy (`0::/path`).
fn own_v2_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_owned)
}

/// The mount point and root of the cgroup2 filesystem, from `/proc/self/mountinfo`.
fn v2_mount(mountinfo: &str) -> Option<(String, String)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        Some((unescape(fields.get(4)?), unescape(fields.get(3)?)))
    })
}

/// mountinfo escapes spaces and a few others as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the cgroup at `rel` is a systemd unit's, which systemd owns.
fn systemd_unit(rel: &str) -> bool {
    let last = rel.rsplit('/').next().unwrap_or("");
    last.ends_with(".service") || last.ends_with(".scope")
}

/// Whether systemd delegated the cgroup (`Delegate=yes` marks it).
fn delegated(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let name = CString::new(*name).expect("no NUL");
        let mut value = [0u8; 8];
        // SAFETY: valid C strings and a buffer of the given length.
        let n = unsafe {
            libc::getxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len())
        };
        n > 0 && value[0] == b'1'
    })
}

fn writable(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: a valid C string.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// In the watcher: `1` to `cgroup.kill`.
///
/// # Safety
/// Async-signal-safe calls only, on paths prepared before the fork.
pub(super) unsafe fn kill_from_watcher(c: &CgroupPaths) {
    // SAFETY: in the watcher (this fn's contract): async-signal-safe calls on a C string
    // prepared before the fork and an fd opened here.
    unsafe {
        let fd = libc::open(c.kill.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
}

/// In the watcher: removes the cgroup once its killed processes are gone (at most a second).
///
/// # Safety
/// Async-signal-safe calls only, on paths prepared before the fork.
pub(super) unsafe fn remove_from_watcher(c: &CgroupPaths) {
    // SAFETY: in the watcher (this fn's contract): async-signal-safe calls on a C string
    // prepared before the fork and a local timespec.
    unsafe {
        let pause = libc::timespec { tv_sec: 0, tv_nsec: 5_000_000 };
        for _ in 0..200 {
            if libc::rmdir(c.dir.as_ptr()) == 0 || *libc::__errno_location() != libc::EBUSY {
                return;
            }
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_path_and_mount_and_tells_systemd_units() {
        let own = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/app.service\n";
        assert_eq!(own_v2_path(own).as_deref(), Some("/system.slice/app.service"));
        assert_eq!(own_v2_path("4:memory:/x\n"), None);
        let mounts = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(v2_mount(mounts), Some(("/sys/fs/cgroup/unified".into(), "/".into())));
        let spaced = "41 31 0:38 /a\\040b /mnt/c\\040g rw - cgroup2 none rw\n";
        assert_eq!(v2_mount(spaced), Some(("/mnt/c g".into(), "/a b".into())));
        assert!(systemd_unit("system.slice/app.service"));
        assert!(systemd_unit("user.slice/user-0.slice/session-1.scope"));
        assert!(!systemd_unit("system.slice/app.service/presup"));
        assert!(!systemd_unit(""));
    }

    #[test]
    fn only_presup_pid_names_are_stale_candidates() {
        let names: Vec<String> = [
            "presup-4242",
            "presup-",
            "presup-12a",
            "presup-007",
            "presup-1",
            "other-5",
            "presup-77",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(stale_candidates(&names), [4242, 1, 77]);
        assert_eq!(stale_candidates(&["presup-99999999999".into()]), Vec::<u32>::new());
    }
}
