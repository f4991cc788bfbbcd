//! The only place that forks or execs.
//!
//! [`Command::prepare`] does everything that allocates or can fail in a describable way
//! (resolving the program through `PATH`, building C strings and pointer arrays) *before*
//! `fork`. Between `fork` and `execve` the child makes only async-signal-safe system calls:
//! no allocation, no logging, no locks. If a step fails there, the child writes which step and
//! its errno to a close-on-exec pipe and `_exit`s with 127; the master reads that pipe once
//! (it closes at a successful `execve`) and turns it into a [`SpawnError`].
//!
//! What every child gets, in order: its own process group; the children's cgroup, when the
//! master has one ([`crate::watcher::Cgroup`]); default signal dispositions and an
//! empty signal mask; the umask; its user and groups; `PR_SET_PDEATHSIG(SIGKILL)` followed by a `getppid()`
//! re-check (so a master that died during the fork cannot leave an orphan); its directory; the
//! listeners at fds 3, 4, ...; every other fd above them marked close-on-exec; and, when asked,
//! `LISTEN_PID` set to its own pid.
#![allow(unsafe_code)] // fork, the signal mask around it, the raw syscalls up to exec.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::unistd::Pid;

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("empty command")]
    Empty,
    #[error("{program}: command not found in PATH")]
    NotFound { program: String },
    #[error("{program}: a string holds a NUL byte")]
    Nul { program: String },
    #[error("cannot fork: {0}")]
    Fork(#[source] io::Error),
    #[error("cannot execute {program}: {source}")]
    Exec { program: PathBuf, source: io::Error },
    #[error("cannot enter directory {dir}: {source}")]
    Chdir { dir: PathBuf, source: io::Error },
    #[error("cannot set up the child ({step}): {source}")]
    Setup { step: &'static str, source: io::Error },
    #[error("the master runs {0} threads and forks only with one: fork() copies only the calling thread, so a lock another thread holds would stay locked forever in the child")]
    Threads(usize),
}

/// How many threads this process has (from `/proc/self/status`; 1 if it cannot be read).
pub fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(1)
}

/// Checked before every fork of a child (exec'd or not): the child of a process with other
/// threads may find a lock (malloc's, say) held forever, and a forked preload worker
/// allocates. The master checks at startup, before the watcher and around the preload; this
/// catches a thread started since (a few microseconds per fork).
fn single_threaded() -> Result<(), SpawnError> {
    match thread_count() {
        1 => Ok(()),
        n => Err(SpawnError::Threads(n)),
    }
}

/// A command ready to be forked and exec'd any number of times.
pub struct Command {
    program: CString,
    program_path: PathBuf,
    dir: CString,
    dir_path: PathBuf,
    argv: Vec<CString>,
    env: Vec<Vec<u8>>,
    /// Entries of `env` whose value the child fills with its own pid: (index, value offset).
    pid_vars: Vec<(usize, usize)>,
    umask: Option<u32>,
    credentials: Option<Credentials>,
    cgroup_procs: Option<RawFd>,
    cgroup_dir: Option<RawFd>,
}

/// How every child of a kind is set up, beyond its command and environment.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    /// Variables set to the child's own pid (`LISTEN_PID`, `WATCHDOG_PID`), which only the
    /// child knows.
    pub pid_vars: Vec<&'static str>,
    pub umask: Option<u32>,
    /// Drop to these before exec (the master may keep root).
    pub credentials: Option<Credentials>,
    /// The children's cgroup's `cgroup.procs` (open for writing): the child joins it first.
    pub cgroup_procs: Option<RawFd>,
    /// The children's cgroup's directory: an exec'd child is made in it with
    /// `clone3(CLONE_INTO_CGROUP)` where the kernel can, and joins it through `cgroup_procs`
    /// where it cannot.
    pub cgroup_dir: Option<RawFd>,
}

/// The user and groups a child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's, from the group database).
    pub groups: Vec<u32>,
}

/// Why `user` or `group` could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot look up {kind} {name:?}: {source}")]
    Lookup {
        kind: &'static str,
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("no such {kind} {name:?}")]
    NoSuch { kind: &'static str, name: String },
    #[error("user name {0:?} holds NUL")]
    Nul(String),
    #[error("cannot list the groups of {name:?}: {source}")]
    Groups {
        name: String,
        #[source]
        source: nix::Error,
    },
}

impl Credentials {
    /// Looks up `user` and `group` (either may be absent); `None` when both are.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
    ) -> Result<Option<Credentials>, CredentialsError> {
        use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        fn lookup(kind: &'static str, name: &str) -> impl FnOnce(nix::Error) -> CredentialsError {
            let name = name.to_owned();
            move |source| CredentialsError::Lookup { kind, name, source }
        }
        let no_such = |kind, name: &str| CredentialsError::NoSuch { kind, name: name.to_owned() };
        let found = match user {
            Some(name) => Some(
                User::from_name(name)
                    .map_err(lookup("user", name))?
                    .ok_or_else(|| no_such("user", name))?,
            ),
            None => None,
        };
        let gid = match group {
            Some(name) => {
                Group::from_name(name)
                    .map_err(lookup("group", name))?
                    .ok_or_else(|| no_such("group", name))?
                    .gid
            }
            None => found.as_ref().map_or(Gid::current(), |u| u.gid),
        };
        let uid = found.as_ref().map_or(Uid::current(), |u| u.uid);
        let groups = match &found {
            Some(u) => {
                let name = CString::new(u.name.as_bytes())
                    .map_err(|_| CredentialsError::Nul(u.name.clone()))?;
                getgrouplist(&name, gid)
                    .map_err(|source| CredentialsError::Groups { name: u.name.clone(), source })?
            }
            None => vec![gid],
        };
        Ok(Some(Credentials {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            groups: groups.into_iter().map(|g| g.as_raw()).collect(),
        }))
    }
}

/// Width reserved for the digits of `LISTEN_PID` (a pid fits in 10).
const PID_DIGITS: usize = 20;

impl Command {
    /// Resolves `argv[0]` (relative to `dir` when it holds a `/`, else through the `PATH` of
    /// `env`) and builds everything the child needs. `env` is the complete environment; when
    /// each of `setup.pid_vars` is added, holding the child's own pid.
    pub fn prepare(
        argv: &[String],
        env: &[(String, String)],
        dir: &Path,
        setup: &Setup,
    ) -> Result<Command, SpawnError> {
        let first = argv.first().filter(|p| !p.is_empty()).ok_or(SpawnError::Empty)?;
        let nul = || SpawnError::Nul { program: first.clone() };
        let path_var = env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str());
        let program_path = resolve(first, dir, path_var)?;
        let cstr = |b: &[u8]| CString::new(b).map_err(|_| nul());
        let mut envs: Vec<Vec<u8>> = Vec::with_capacity(env.len() + 1);
        for (k, v) in env {
            let entry = format!("{k}={v}").into_bytes();
            if entry.contains(&0) {
                return Err(nul());
            }
            envs.push(entry);
        }
        let mut pid_vars = Vec::new();
        for name in &setup.pid_vars {
            let mut entry = format!("{name}=").into_bytes();
            let offset = entry.len();
            entry.resize(offset + PID_DIGITS, b'0');
            envs.retain(|e| !e.starts_with(&entry[..offset]));
            envs.push(entry);
            pid_vars.push((envs.len() - 1, offset));
        }
        for e in &mut envs {
            e.push(0);
        }
        Ok(Command {
            program: cstr(program_path.as_os_str().as_bytes())?,
            program_path,
            dir: cstr(dir.as_os_str().as_bytes())?,
            dir_path: dir.to_path_buf(),
            argv: argv.iter().map(|a| cstr(a.as_bytes())).collect::<Result<_, _>>()?,
            env: envs,
            pid_vars,
            umask: setup.umask,
            credentials: setup.credentials.clone(),
            cgroup_procs: setup.cgroup_procs,
            cgroup_dir: setup.cgroup_dir,
        })
    }

    /// Forks and execs, placing `fds` at 3, 4, ... in the child. Returns once the child has
    /// exec'd (or failed to).
    pub fn spawn(&self, fds: &[RawFd]) -> Result<Pid, SpawnError> {
        single_threaded()?;
        let mut env = self.env.clone();
        // Every pointer into `env` comes from this one mutable pass.
        let entries: Vec<*mut u8> = env.iter_mut().map(|e| e.as_mut_ptr()).collect();
        // SAFETY: each offset lies inside its entry (PID_DIGITS bytes follow it).
        let pid_slots: Vec<*mut u8> =
            self.pid_vars.iter().map(|&(i, offset)| unsafe { entries[i].add(offset) }).collect();
        let envp = null_terminated(entries.iter().map(|&e| e.cast_const().cast()));
        let argv = null_terminated(self.argv.iter().map(|a| a.as_ptr()));
        let mut scratch: Vec<RawFd> = vec![-1; fds.len()];
        let (err_read, err_write) = cloexec_pipe().map_err(SpawnError::Fork)?;
        let child = ChildPlan {
            program: self.program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            dir: self.dir.as_ptr(),
            fds,
            scratch: scratch.as_mut_ptr(),
            pid_slots: &pid_slots,
            umask: self.umask,
            credentials: self.credentials.as_ref(),
            cgroup_procs: self.cgroup_procs,
            parent: nix::unistd::getpid().as_raw(),
            report: err_write.as_raw_fd(),
        };
        let pid = match self.cgroup_dir.filter(|_| CLONE3_INTO_CGROUP.load(Ordering::Relaxed)) {
            // Made in the cgroup: no write to cgroup.procs, which after an idle spell costs
            // the child an RCU grace period (~15 ms) on its way to exec.
            Some(dir) => {
                let plan = ChildPlan { cgroup_procs: None, ..child };
                // SAFETY: in the child, on memory prepared before the clone.
                match clone3_blocked(dir, || unsafe { child_main(&plan) }) {
                    Ok(pid) => pid,
                    Err(e) if clone3_unsupported(&e) => {
                        CLONE3_INTO_CGROUP.store(false, Ordering::Relaxed);
                        // SAFETY: as below.
                        fork_blocked(|| unsafe { child_main(&child) }).map_err(SpawnError::Fork)?
                    }
                    Err(e) => return Err(SpawnError::Fork(e)),
                }
            }
            // SAFETY: in the child, on memory prepared before the fork.
            None => fork_blocked(|| unsafe { child_main(&child) }).map_err(SpawnError::Fork)?,
        };
        drop(err_write);
        match read_report(err_read) {
            None => Ok(pid),
            Some((step, errno)) => Err(step.error(
                Some(&self.program_path),
                &self.dir_path,
                io::Error::from_raw_os_error(errno),
            )),
        }
    }
}

/// The steps of the child that can fail, as written to the report pipe.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Step {
    Group = 1,
    Orphan = 2,
    Chdir = 3,
    Fds = 4,
    Exec = 5,
    Credentials = 6,
}

impl Step {
    const ALL: [Step; 6] =
        [Step::Group, Step::Orphan, Step::Chdir, Step::Fds, Step::Exec, Step::Credentials];

    fn from_u8(byte: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|&s| s as u8 == byte)
    }

    /// What the master reports when the child failed at this step (`program` is `None` for a
    /// child forked without exec).
    fn error(self, program: Option<&Path>, dir: &Path, source: io::Error) -> SpawnError {
        match (self, program) {
            (Step::Exec, Some(program)) => {
                SpawnError::Exec { program: program.to_path_buf(), source }
            }
            (Step::Exec, None) => SpawnError::Setup { step: "exec", source },
            (Step::Chdir, _) => SpawnError::Chdir { dir: dir.to_path_buf(), source },
            (Step::Fds, _) => SpawnError::Setup { step: "placing the listeners", source },
            (Step::Group, _) => SpawnError::Setup { step: "setpgid", source },
            (Step::Credentials, _) => SpawnError::Setup { step: "dropping privileges", source },
            (Step::Orphan, _) => {
                SpawnError::Setup { step: "the master died during the spawn", source }
            }
        }
    }
}

/// Everything the child touches, as raw pointers into memory prepared before the fork.
struct ChildPlan<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    dir: *const libc::c_char,
    fds: &'a [RawFd],
    scratch: *mut RawFd,
    /// Where the child writes its pid (PID_DIGITS bytes each).
    pid_slots: &'a [*mut u8],
    umask: Option<u32>,
    credentials: Option<&'a Credentials>,
    cgroup_procs: Option<RawFd>,
    parent: libc::pid_t,
    report: RawFd,
}

/// Forks with every signal blocked (so no handler of the master runs in the child before its
/// dispositions are reset) and runs `child` in the child; returns the child's pid in the master.
fn fork_blocked(child: impl FnOnce()) -> io::Result<Pid> {
    with_signals_blocked(|| {
        // SAFETY: the master is single-threaded (checked at startup and before each child's
        // fork), so the child is a faithful copy; the child runs only `child_main`, which
        // makes async-signal-safe calls and never returns.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            child();
            // SAFETY: `child` never returns; if it did, the child must not go on as the master.
            unsafe { libc::_exit(127) }
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pid::from_raw(pid))
    })
}

/// Whether `clone3(CLONE_INTO_CGROUP)` worked so far (cleared at its first refusal: an old
/// kernel, a seccomp filter, a cgroup it does not apply to).
static CLONE3_INTO_CGROUP: AtomicBool = AtomicBool::new(true);

/// The errors that say `clone3(CLONE_INTO_CGROUP)` cannot be used here, rather than that a
/// process cannot be made now.
fn clone3_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENOSYS
                | libc::EINVAL
                | libc::E2BIG
                | libc::EPERM
                | libc::EOPNOTSUPP
                | libc::EBUSY
        )
    )
}

/// The kernel's `struct clone_args` up to `cgroup` (its version 2, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
const SYS_CLONE3: libc::c_long = 435;

/// [`fork_blocked`], with the child made in the cgroup whose directory is `cgroup`.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
fn clone3_blocked(cgroup: RawFd, child: impl FnOnce()) -> io::Result<Pid> {
    let args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    with_signals_blocked(|| {
        // SAFETY: like fork (no CLONE_VM, no new stack: the child runs on a copy of this one),
        // in a single-threaded master, so the child is a faithful copy; it runs only
        // `child_main`, which makes raw system calls (none that reads glibc's thread
        // bookkeeping, which a raw clone3 does not update) and never returns.
        let pid = unsafe {
            libc::syscall(SYS_CLONE3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>())
        };
        if pid == 0 {
            child();
            // SAFETY: `child` never returns; if it did, the child must not go on as the master.
            unsafe { libc::_exit(127) }
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pid::from_raw(pid as i32))
    })
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64")))]
fn clone3_blocked(_cgroup: RawFd, _child: impl FnOnce()) -> io::Result<Pid> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Runs `f` with every signal blocked, then restores the mask.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data; sigfillset/pthread_sigmask only write the given sets.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above, valid pointers to owned sets.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    let out = f();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    out
}

/// The child between fork and exec. Only async-signal-safe calls; never returns.
///
/// # Safety
/// Must run in a freshly forked child of a single-threaded process, with `plan` pointing to
/// memory prepared before the fork.
unsafe fn child_main(plan: &ChildPlan<'_>) -> ! {
    // SAFETY: in the freshly forked child of a single-threaded process (this fn's contract), on
    // the plan's memory prepared before the fork: each call below is async-signal-safe or one
    // of this module's functions whose contract that is.
    unsafe {
        let fail = |step: Step| -> ! { report_and_exit(plan.report, step) };
        let after_fork = AfterFork {
            umask: plan.umask,
            credentials: plan.credentials,
            cgroup_procs: plan.cgroup_procs,
            parent: plan.parent,
            dir: plan.dir,
        };
        if let Err(step) = after_fork.apply() {
            fail(step);
        }
        if place_fds(plan.fds, plan.scratch).is_err() {
            fail(Step::Fds);
        }
        for &slot in plan.pid_slots {
            write_pid(slot, libc::getpid());
        }
        libc::execve(plan.program, plan.argv, plan.envp);
        fail(Step::Exec)
    }
}

/// Writes which step failed and its errno to the report pipe, then exits 127.
///
/// # Safety
/// Only in a forked child.
unsafe fn report_and_exit(report: RawFd, step: Step) -> ! {
    // SAFETY: in a forked child (this fn's contract): errno is this thread's, `msg` is a local
    // buffer of the length given, and `_exit` ends the child without running anything of the
    // master's.
    unsafe {
        let errno = *libc::__errno_location();
        let mut msg = [0u8; 5];
        msg[0] = step as u8;
        msg[1..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// What every child gets, exec'd or not: see the module's docs.
struct AfterFork<'a> {
    umask: Option<u32>,
    credentials: Option<&'a Credentials>,
    cgroup_procs: Option<RawFd>,
    parent: libc::pid_t,
    dir: *const libc::c_char,
}

impl AfterFork<'_> {
    /// Only async-signal-safe calls.
    ///
    /// # Safety
    /// Only in a freshly forked child, with `dir` pointing to memory prepared before the fork.
    unsafe fn apply(&self) -> Result<(), Step> {
        // SAFETY: in a freshly forked child (this fn's contract): only async-signal-safe calls,
        // on fds and sets owned here and `dir`, a C string prepared before the fork.
        unsafe {
            if libc::setpgid(0, 0) != 0 {
                return Err(Step::Group);
            }
            // Before anything can fork, and while still privileged. Best effort: without it the
            // child is still covered by its process group.
            if let Some(fd) = self.cgroup_procs {
                libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            for signo in 1..libc::SIGRTMAX() {
                if signo != libc::SIGKILL && signo != libc::SIGSTOP {
                    libc::signal(signo, libc::SIG_DFL);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            if let Some(mask) = self.umask {
                libc::umask(mask as libc::mode_t);
            }
            if let Some(c) = self.credentials {
                // Groups first, while still privileged; then the gid; the uid last.
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                    && c.uid != libc::geteuid()
                    || libc::setgid(c.gid) != 0
                    || libc::setuid(c.uid) != 0
                {
                    return Err(Step::Credentials);
                }
            }
            // Armed after the privilege drop, which clears it.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0);
            if libc::getppid() != self.parent {
                return Err(Step::Orphan);
            }
            if libc::chdir(self.dir) != 0 {
                return Err(Step::Chdir);
            }
            Ok(())
        }
    }
}

/// A child forked without exec (the preload mode): it gets what every child gets, closes the
/// master's own fds in `close`, then runs `body` and exits with its code through `_exit`, so
/// that none of the master's destructors or exit handlers ever runs in it.
pub fn fork_call(
    dir: &Path,
    setup: &Setup,
    close: &[RawFd],
    body: impl FnOnce() -> i32,
) -> Result<Pid, SpawnError> {
    single_threaded()?;
    let dir_c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| SpawnError::Nul { program: dir.display().to_string() })?;
    let (err_read, err_write) = cloexec_pipe().map_err(SpawnError::Fork)?;
    let after_fork = AfterFork {
        umask: setup.umask,
        credentials: setup.credentials.as_ref(),
        cgroup_procs: setup.cgroup_procs,
        parent: nix::unistd::getpid().as_raw(),
        dir: dir_c.as_ptr(),
    };
    let (report, report_read) = (err_write.as_raw_fd(), err_read.as_raw_fd());
    let pid = fork_blocked(|| {
        // SAFETY: in the freshly forked child of the single-threaded master.
        unsafe {
            if let Err(step) = after_fork.apply() {
                report_and_exit(report, step);
            }
            for &fd in close.iter().chain([&report_read]) {
                libc::close(fd);
            }
            // Set up: the master reads the end of the report pipe as success.
            libc::close(report);
        }
        let code = run_to_exit_code(body);
        // SAFETY: ends the child without unwinding into the master's frames or running its
        // exit handlers and destructors.
        unsafe { libc::_exit(code) }
    })
    .map_err(SpawnError::Fork)?;
    drop(err_write);
    match read_report(err_read) {
        None => Ok(pid),
        Some((step, errno)) => Err(step.error(None, dir, io::Error::from_raw_os_error(errno))),
    }
}

/// Runs a forked worker's `body` to its exit code; a panic makes it 101, as for a Rust
/// program whose `main` panics, after the panic hook printed the message and location.
///
/// Built with `panic = "unwind"` (the dev profile), the panic is caught; a panic in another
/// thread of the worker ends only that thread, as in any program (tokio catches its tasks').
#[cfg(panic = "unwind")]
fn run_to_exit_code(body: impl FnOnce() -> i32) -> i32 {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101)
}

/// Built with `panic = "abort"` (presup's release profile), nothing can be caught: a panic in
/// any thread would abort the worker (SIGABRT). A panic hook, run before the abort, prints
/// what the hook before it prints (the default one: the message and location) and ends the
/// worker with `_exit(101)` instead; a hook the worker function sets replaces it.
#[cfg(panic = "abort")]
fn run_to_exit_code(body: impl FnOnce() -> i32) -> i32 {
    let before = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        before(info);
        // SAFETY: the process is about to abort anyway; `_exit` ends it without running the
        // master's exit handlers, and what another thread holds no longer matters.
        unsafe { libc::_exit(101) }
    }));
    body()
}

/// Forks a helper of the master (the [`crate::watcher`]) that runs `body` with every signal
/// blocked (only SIGKILL and SIGSTOP reach it), in its own process group (a signal to the
/// master's group does not take it), in `/`, with every fd closed but `keep`. `body` makes only
/// async-signal-safe calls and never returns (if it did, the helper would exit 127).
pub fn fork_helper(keep: RawFd, body: impl FnOnce()) -> Result<Pid, SpawnError> {
    // Read before the fork: the bound of the loop that stands in for close_range.
    let limit = fd_limit();
    fork_blocked(|| {
        // SAFETY: in the freshly forked child. The master forks its watcher after checking
        // that it runs one thread, but the unit tests fork it from their threads, so this
        // fork checks nothing: what makes it sound is that the child makes only
        // async-signal-safe calls, on memory prepared before the fork, and takes no lock. The
        // signal mask stays the full one fork_blocked set.
        unsafe {
            libc::setpgid(0, 0);
            libc::chdir(c"/".as_ptr());
            let keep = keep as libc::c_uint;
            if keep > 0 {
                close_range(0, keep - 1, limit);
            }
            close_range(keep + 1, libc::c_uint::MAX, limit);
        }
        body()
    })
    .map_err(SpawnError::Fork)
}

/// Closes the fds `first..=last`, with a loop where the kernel lacks close_range (below
/// Linux 5.9), up to `limit` (the fd limit, [`fd_limit`]: no fd is numbered at or above it).
///
/// # Safety
/// Closes fds that others may own: only in a forked child.
unsafe fn close_range(first: libc::c_uint, last: libc::c_uint, limit: libc::c_uint) {
    // SAFETY: in a forked child (this fn's contract), whose fds are its own to close.
    unsafe {
        if libc::syscall(libc::SYS_close_range, first, last, 0) != 0 {
            for fd in fallback_fds(first, last, limit) {
                libc::close(fd as RawFd);
            }
        }
    }
}

/// The fds the loop of [`close_range`] closes: `first..=last`, below `limit`.
fn fallback_fds(
    first: libc::c_uint,
    last: libc::c_uint,
    limit: libc::c_uint,
) -> std::ops::RangeInclusive<libc::c_uint> {
    match limit.checked_sub(1) {
        Some(highest) => first..=last.min(highest),
        None => std::ops::RangeInclusive::new(1, 0),
    }
}

/// The process's fd limit (`RLIMIT_NOFILE`, soft): every fd it opened is numbered below it,
/// unless the limit was lowered since. Read before a fork; the child allocates nothing.
fn fd_limit() -> libc::c_uint {
    use nix::sys::resource::{getrlimit, Resource};
    let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    soft.min(libc::c_uint::MAX as u64) as libc::c_uint
}

/// Moves `fds` to 3, 4, ... (clearing close-on-exec there) and marks every fd above them
/// close-on-exec. Copies go above the target range first so that no source is overwritten.
///
/// # Safety
/// `scratch` must point to `fds.len()` writable ints; call only in the forked child.
unsafe fn place_fds(fds: &[RawFd], scratch: *mut RawFd) -> Result<(), ()> {
    // SAFETY: in the forked child (this fn's contract), with `scratch` pointing to `fds.len()`
    // writable ints: `i` stays below that; the fds are the child's own.
    unsafe {
        let first_free = 3 + fds.len() as libc::c_int;
        for (i, &fd) in fds.iter().enumerate() {
            let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, first_free);
            if copy < 0 {
                return Err(());
            }
            *scratch.add(i) = copy;
        }
        for i in 0..fds.len() {
            if libc::dup2(*scratch.add(i), 3 + i as libc::c_int) < 0 {
                return Err(());
            }
        }
        // Belt and braces: fds the master inherited without close-on-exec do not leak either.
        // Older kernels lack close_range; close-on-exec already covers what the master opened.
        libc::syscall(
            libc::SYS_close_range,
            first_free as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
        Ok(())
    }
}

/// Writes `pid` in decimal followed by NUL at `at` (room for [`PID_DIGITS`] bytes).
///
/// # Safety
/// `at` must point to at least `PID_DIGITS` writable bytes.
unsafe fn write_pid(at: *mut u8, pid: libc::pid_t) {
    // SAFETY: `at` points to `PID_DIGITS` writable bytes (this fn's contract) and a pid has
    // fewer digits, so `len` and `len - 1` stay inside them.
    unsafe {
        let mut digits = [0u8; PID_DIGITS];
        let mut n = pid as u64;
        let mut len = 0;
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in 0..len {
            *at.add(i) = digits[len - 1 - i];
        }
        *at.add(len) = 0;
    }
}

fn null_terminated<T>(items: impl Iterator<Item = *const T>) -> Vec<*const T> {
    let mut v: Vec<*const T> = items.collect();
    v.push(std::ptr::null());
    v
}

fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads the child's report: `None` when the pipe closed empty (exec succeeded).
fn read_report(read: OwnedFd) -> Option<(Step, i32)> {
    let mut file = std::fs::File::from(read);
    let mut msg = [0u8; 5];
    let mut got = 0;
    while got < msg.len() {
        match io::Read::read(&mut file, &mut msg[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if got < msg.len() {
        return None;
    }
    let step = Step::from_u8(msg[0]).unwrap_or(Step::Exec);
    Some((step, i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]])))
}

/// Finds the file `execve` will run, the way a shell would.
fn resolve(program: &str, dir: &Path, path_var: Option<&str>) -> Result<PathBuf, SpawnError> {
    if program.contains('/') {
        return Ok(dir.join(program));
    }
    let path_var = path_var.map(str::to_owned).or_else(|| std::env::var("PATH").ok());
    let path_var = path_var.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
    let mut not_executable = None;
    for entry in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = dir.join(entry).join(OsStr::new(program));
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => not_executable = not_executable.or(Some(candidate)),
            _ => {}
        }
    }
    // A file found but not executable: let execve report EACCES with its path.
    not_executable.ok_or_else(|| SpawnError::NotFound { program: program.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test process has threads (the harness's, and one started here for sure): neither
    /// kind of child is forked from it, and the error says why.
    #[test]
    fn no_child_is_forked_from_a_process_with_other_threads() {
        let (stop, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || wait.recv());
        let threads = thread_count();
        assert!(threads >= 2, "{threads}");
        let setup = Setup::default();
        let argv = ["true".to_owned()];
        let exec = Command::prepare(&argv, &[], Path::new("/"), &setup).unwrap().spawn(&[]);
        let forked = fork_call(Path::new("/"), &setup, &[], || 0);
        stop.send(()).unwrap();
        other.join().unwrap().unwrap();
        for result in [exec, forked] {
            let e = result.expect_err("forked with other threads running");
            assert!(matches!(e, SpawnError::Threads(n) if n >= 2), "{e:?}");
            assert!(e.to_string().contains("forks only with one"), "{e}");
        }
        let none = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        assert_eq!(none, Err(nix::errno::Errno::ECHILD), "no child");
    }

    #[test]
    fn the_close_range_fallback_includes_last_and_reaches_the_fd_limit() {
        assert_eq!(fallback_fds(3, 9, 1024), 3..=9, "last included");
        assert_eq!(fallback_fds(0, 2, 1024), 0..=2);
        let above = fallback_fds(5, libc::c_uint::MAX, 65_536);
        assert_eq!(above, 5..=65_535, "fds above 4096 too, up to the limit");
        assert!(fallback_fds(10, libc::c_uint::MAX, 8).is_empty());
        assert!(fallback_fds(0, 5, 0).is_empty());
    }

    #[test]
    fn every_step_survives_the_report_pipe_and_is_named() {
        for step in Step::ALL {
            assert_eq!(Step::from_u8(step as u8).map(|s| s as u8), Some(step as u8));
            let source = || io::Error::from_raw_os_error(libc::EPERM);
            let forked = step.error(None, Path::new("/d"), source()).to_string();
            let execd = step.error(Some(Path::new("/bin/x")), Path::new("/d"), source());
            assert!(!forked.contains("master died") || matches!(step, Step::Orphan), "{forked}");
            if let Step::Exec = step {
                assert!(execd.to_string().contains("/bin/x"), "{execd}");
            }
        }
        assert!(Step::from_u8(0).is_none());
    }

    #[test]
    fn resolves_through_path_and_relative_to_dir() {
        let p = resolve("sh", Path::new("/"), Some("/nonexistent:/bin:/usr/bin")).unwrap();
        assert!(p.ends_with("sh"), "{p:?}");
        assert_eq!(
            resolve("./app.py", Path::new("/srv/app"), None).unwrap(),
            PathBuf::from("/srv/app/./app.py")
        );
        assert!(matches!(
            resolve("no-such-program-presup", Path::new("/"), Some("/bin")),
            Err(SpawnError::NotFound { .. })
        ));
    }

    #[test]
    fn pid_digits_are_written_with_nul() {
        let mut buf = [b'x'; PID_DIGITS];
        // SAFETY: buf has PID_DIGITS bytes.
        unsafe { write_pid(buf.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buf[..8], b"4194304\0");
        // SAFETY: as above.
        unsafe { write_pid(buf.as_mut_ptr(), 7) };
        assert_eq!(&buf[..2], b"7\0");
    }
}
