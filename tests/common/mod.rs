//! The integration tests' harness: one real `presup` master per test, in its own temp dir,
//! with tiny fixture children written as shell scripts.
//!
//! Waits are event-driven with generous deadlines: the master's log lines arrive through a
//! pipe (read by a thread that wakes waiters), and fixture children leave files behind that
//! [`wait_until`] polls cheaply. A [`Presup`] kills what it started when dropped and fails the
//! test if any process it knows of outlives it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The default deadline of a wait: generous, since CI machines are slow and shared.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// The log lines of a master, shared with the thread that reads them.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

impl Log {
    fn follow(self, pipe: impl std::io::Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("PRESUP_TEST_ECHO").is_some() {
                    eprintln!("[presup] {line}");
                }
                let (m, cv) = &*self.inner;
                m.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*self.inner;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
    }

    pub fn lines(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().lines.clone()
    }

    pub fn text(&self) -> String {
        self.lines().join("\n")
    }

    pub fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `n` lines contain `needle`; returns the `n`-th.
    pub fn wait_for_nth(&self, needle: &str, n: usize) -> String {
        let (m, cv) = &*self.inner;
        let end = Instant::now() + DEADLINE;
        let mut state = m.lock().unwrap();
        loop {
            let found: Vec<&String> = state.lines.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let now = Instant::now();
            assert!(
                now < end && !state.closed,
                "no {n}th log line containing {needle:?} (log closed: {}); log so far:\n{}",
                state.closed,
                state.lines.join("\n")
            );
            state = cv.wait_timeout(state, end - now).unwrap().0;
        }
    }

    /// Waits until the log's pipe is closed: every writer has exited.
    pub fn wait_closed(&self) {
        let (m, cv) = &*self.inner;
        let end = Instant::now() + DEADLINE;
        let mut state = m.lock().unwrap();
        while !state.closed {
            let now = Instant::now();
            assert!(now < end, "the log pipe stayed open: a child outlived the master?");
            state = cv.wait_timeout(state, end - now).unwrap().0;
        }
    }

    /// Waits for a log line containing `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_nth(needle, 1)
    }
}

/// A test's temp dir with a config and fixture scripts.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir { tmp: tempfile::Builder::new().prefix("presup-test-").tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path().join(p)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes an executable `#!/bin/sh` script. Each fixture script first appends its pid to
    /// `pids` so that the harness can check that nothing outlives the test.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.write(
            name,
            &format!("#!/bin/sh\necho $$ >> \"{}/pids\"\n{body}\n", self.path().display()),
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.join(name)).unwrap_or_default()
    }

    pub fn lines(&self, name: &str) -> Vec<String> {
        self.read(name).lines().map(str::to_owned).collect()
    }

    /// Every pid a fixture recorded.
    pub fn pids(&self) -> Vec<i32> {
        self.lines("pids").iter().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

/// A running master.
pub struct Presup {
    pub child: Child,
    pub log: Log,
    pub status: Option<ExitStatus>,
    pids_dir: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_presup")
}

impl Presup {
    /// Starts `presup -c <dir>/supervisor.toml` with `toml` as the config.
    pub fn start(dir: &Dir, toml: &str) -> Presup {
        dir.write("supervisor.toml", toml);
        Presup::start_with(dir, &[], &[])
    }

    /// Starts the master on `<dir>/supervisor.toml` with extra arguments and environment.
    pub fn start_with(dir: &Dir, args: &[&str], env: &[(&str, &str)]) -> Presup {
        Presup::start_via(dir, &[], args, env)
    }

    /// Like [`Presup::start_with`], with the master run by `wrapper` (a command line that
    /// ends where presup's begins, like `systemd-socket-activate -l ...`). `pid()` is then the
    /// wrapper's: [`Presup::master_pid`] is the master's.
    pub fn start_via(dir: &Dir, wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Presup {
        Presup::launch(dir, bin(), wrapper, args, env)
    }

    /// Starts `program`, a program built on `presup::prefork` (it takes presup's options).
    pub fn start_program(dir: &Dir, program: &str, args: &[&str]) -> Presup {
        Presup::launch(dir, program, &[], args, &[])
    }

    fn launch(
        dir: &Dir,
        program: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Presup {
        let mut cmd = match wrapper.split_first() {
            None => Command::new(program),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
        };
        cmd.arg("-c")
            .arg(dir.join("supervisor.toml"))
            .arg("--log-level")
            .arg("debug")
            .args(args)
            .current_dir(dir.path())
            .env_remove("WEB_CONCURRENCY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn presup");
        let log = Log::default();
        log.clone().follow(child.stderr.take().unwrap());
        Presup { child, log, status: None, pids_dir: dir.path().to_path_buf() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The master's pid, from its first log line.
    pub fn master_pid(&self) -> i32 {
        let line = self.log.wait_for("master started");
        line.split("pid=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
    }

    /// The pid of the master's watcher (a child of the master that is not one of its
    /// workers, singletons or hooks), from its log.
    pub fn watcher_pid(&self) -> i32 {
        let line = self.log.wait_for("watcher started");
        line.split("pid=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the master to exit and returns its exit code (`None` if killed by a signal).
    pub fn wait_exit(&mut self) -> Option<i32> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                // Every line is in once the pipe is closed (by the master and its workers).
                self.log.wait_closed();
                return s.code();
            }
            assert!(Instant::now() < end, "presup did not exit; log:\n{}", self.log.text());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The port the master's listener named `name` is bound to (from its log).
    pub fn port(&self, name: &str) -> u16 {
        let line = self.log.wait_for(&format!("name={name} address="));
        let addr = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
        addr.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Presup {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Every process a fixture recorded must be gone (PDEATHSIG does it for workers).
        let pids = std::fs::read_to_string(self.pids_dir.join("pids")).unwrap_or_default();
        let pids: Vec<i32> = pids.lines().filter_map(|l| l.trim().parse().ok()).collect();
        let end = Instant::now() + Duration::from_secs(10);
        let mut left: Vec<i32> = pids.clone();
        while !left.is_empty() && Instant::now() < end {
            left.retain(|&p| alive(p));
            std::thread::sleep(Duration::from_millis(5));
        }
        for &p in &left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if !left.is_empty() && !std::thread::panicking() {
            panic!("processes outlived the test: {left:?}");
        }
    }
}

/// Whether `pid` is a live process (a zombie counts as dead).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Runs `presup` to completion (for `check` and config errors).
pub fn run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .current_dir(dir)
        .env_remove("WEB_CONCURRENCY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP GET to 127.0.0.1:`port`; returns the body.
pub fn http_get(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: t\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    match out.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200") =>
        {
            Ok(body.to_owned())
        }
        _ => Err(std::io::Error::other(format!("bad response: {out:?}"))),
    }
}
