//! Processes seen from the test: signals, `/proc` readers (state, parent, environment, command
//! line), waiting for a death, and a guard that kills and reaps a child the test started.

use std::collections::BTreeSet;
use std::process::Child;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{wait_until, DEADLINE};

/// Sends `sig` to `pid`; fails the test if it cannot (the process is gone, say).
pub fn kill(pid: i32, sig: Signal) {
    nix::sys::signal::kill(Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

/// Sends `sig` to `pid` if it still exists (a pid already reaped is no error).
pub fn kill_if_alive(pid: i32, sig: Signal) {
    match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => panic!("kill -{sig} {pid}: {e}"),
    }
}

/// The fields of `/proc/PID/stat` after the command name (`state` is the first), if the
/// process exists.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit(')').next()?.split_whitespace().map(str::to_owned).collect())
}

/// The process's state letter (`R`, `S`, `T`, `Z`...), if it exists.
pub fn state(pid: i32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// The process's parent, if it exists.
pub fn ppid(pid: i32) -> Option<i32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Whether `pid` is a live process (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    !matches!(state(pid), Some('Z') | Some('X') | None)
}

/// Waits until `pid` is dead (gone or a zombie).
pub fn wait_dead(pid: i32) {
    wait_until(&format!("pid {pid} to die"), DEADLINE, || (!alive(pid)).then_some(()));
}

/// The live (non-zombie) children of `parent`, from `/proc`.
pub fn children_of(parent: i32) -> BTreeSet<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return BTreeSet::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| ppid(pid) == Some(parent) && alive(pid))
        .collect()
}

/// The environment of `pid` as `(KEY, VALUE)` pairs: empty if it is gone, or while it is in
/// the middle of an exec (the kernel then shows none).
pub fn environ(pid: i32) -> Vec<(String, String)> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    raw.split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The value of `key` in an environment read by [`environ`].
pub fn var<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The command line of `pid`, its arguments joined by spaces (empty if it is gone).
pub fn cmdline(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ").trim().to_owned()
}

/// A child the test started (a stand-in server, a racing process), killed and reaped when
/// dropped however the test ends.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How many fds process `pid` has open.
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Process `pid`'s resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
