//! The integration tests' harness: one real `presup` master per test, in its own temp dir,
//! with tiny fixture children written as shell scripts.
//!
//! Waits are event-driven with generous deadlines: the master's log lines arrive through a
//! pipe (read by a thread that wakes waiters), and fixture children leave files behind that
//! [`wait_until`] polls cheaply. A [`Presup`] kills what it started when dropped and fails the
//! test if any process it knows of outlives it. A wait that times out shows the tail of the
//! log of every master the test started.
//!
//! Here: the master ([`Presup`], its [`Log`]), the test's directory ([`Dir`]), waits, log fields
//! ([`field`], [`pid_field`]), ports, example programs ([`example`]), the tests' Python. In
//! `process.rs`: signals, `/proc` readers, [`wait_dead`], [`KillOnDrop`].
#![allow(dead_code)]

mod process;
pub use process::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The default deadline of a wait: generous, since CI machines are slow and shared.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline, showing the last
/// lines of the log of every master this test thread started (see [`wait_until_with`]).
pub fn wait_until<T>(what: &str, deadline: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_until_with(what, deadline, String::new, f)
}

/// Like [`wait_until`], with `context()` (the fixtures' record, say) in the failure too.
pub fn wait_until_with<T>(
    what: &str,
    deadline: Duration,
    context: impl FnOnce() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= end {
            let context = context();
            let sep = if context.is_empty() || context.ends_with('\n') { "" } else { "\n" };
            panic!(
                "timed out after {deadline:?} waiting for {what}\n{context}{sep}{}",
                masters_logs()
            );
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// How many of a master's last log lines a failed wait shows.
const LOG_TAIL: usize = 60;

thread_local! {
    /// The logs of the masters started on this thread (a test's), for failed waits to show.
    static MASTERS: std::cell::RefCell<Vec<std::sync::Weak<Shared>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The tail of the log of each master of this thread that is still around.
fn masters_logs() -> String {
    let logs: Vec<Log> = MASTERS.with(|m| {
        m.borrow().iter().filter_map(|w| w.upgrade()).map(|inner| Log { inner }).collect()
    });
    let mut out = String::new();
    for (i, log) in logs.iter().enumerate() {
        let lines = log.lines();
        let skip = lines.len().saturating_sub(LOG_TAIL);
        out.push_str(&format!(
            "master {} log ({} of {} lines):\n",
            i + 1,
            lines.len() - skip,
            lines.len()
        ));
        for l in &lines[skip..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// The value of the `name=` field of a log line (a whitespace-separated word).
pub fn field<T: std::str::FromStr>(line: &str, name: &str) -> T {
    let prefix = format!("{name}=");
    let value = line.split_whitespace().find_map(|w| w.strip_prefix(prefix.as_str()));
    value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// The `pid=` field of a log line.
pub fn pid_field(line: &str) -> i32 {
    field(line, "pid")
}

/// A free TCP port on the loopback (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The example program `name` (of `Cargo.toml`'s examples), beside the `presup` binary, built
/// with every feature (or found up to date) by cargo here: a filtered test run does not build
/// the examples, and a stale one would test old code. Cargo's lock makes concurrent builds
/// wait for each other.
pub fn example(name: &str) -> String {
    let bin = PathBuf::from(bin());
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "--all-features", "--example", name]);
    cargo.current_dir(env!("CARGO_MANIFEST_DIR"));
    if bin.parent().unwrap().ends_with("release") {
        cargo.arg("--release");
    }
    assert!(cargo.status().unwrap().success(), "cargo build --example {name} failed");
    bin.parent().unwrap().join("examples").join(name).display().to_string()
}

/// The log lines of a master, shared with the thread that reads them.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<Shared>,
}

/// A log's lines, and the condition its waiters wait on.
type Shared = (Mutex<LogState>, Condvar);

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    closed: bool,
}

impl Log {
    /// Collects the lines of `pipe` (a child's stderr) on a thread.
    pub fn follow(self, pipe: impl std::io::Read + Send + 'static) {
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

    /// A log nobody writes to (the master's stderr went elsewhere).
    fn close(&self) {
        self.inner.0.lock().unwrap().closed = true;
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

    /// Records `pid` as a fixture would, so that the harness checks it does not outlive the
    /// test (a process that runs no fixture script: a forked worker, a wrapped master).
    pub fn record_pid(&self, pid: i32) {
        use std::io::Write;
        let mut f =
            std::fs::OpenOptions::new().append(true).create(true).open(self.join("pids")).unwrap();
        writeln!(f, "{pid}").unwrap();
    }

    /// Every pid a fixture recorded.
    pub fn pids(&self) -> Vec<i32> {
        self.lines("pids").iter().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

/// The `bin` directory of the tests' Python virtual environment, made on first use with the
/// packages of `tests/requirements.txt` (Flask, gunicorn...) and the project's own Python
/// package (`pip install ./python`): the tests rely on nothing installed by hand. Tests run in
/// parallel processes, so the first one makes it under a file lock and the others wait; a stamp
/// holding the requirements and the package's files says whether it is complete and current
/// (editing `python/presup/*.py` reinstalls the package).
pub fn venv_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(make_venv).clone()
}

fn make_venv() -> PathBuf {
    let requirements = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/requirements.txt");
    let package = PythonPackage::read();
    let mut wanted = std::fs::read_to_string(&requirements).unwrap();
    wanted.push_str(&package.stamp());
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("venv");
    let stamp = venv.join("presup-requirements.txt");
    let lock = std::fs::File::create(venv.with_extension("lock")).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let run = |program: &Path, args: &[&str]| {
            let out = Command::new(program).args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{} {args:?} failed: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Path::new("python3"), &["-m", "venv", &venv.display().to_string()]);
        let req = requirements.display().to_string();
        let pip = |args: &[&str]| {
            run(&venv.join("bin/python3"), &[&["-m", "pip", "install", "--quiet"], args].concat())
        };
        pip(&["-r", &req]);
        // From a copy: pip builds in the source tree, which the tests leave untouched.
        let source = package.copy_to(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("presup-python"));
        pip(&["--force-reinstall", "--no-deps", &source.display().to_string()]);
        std::fs::write(&stamp, &wanted).unwrap();
    }
    venv.join("bin")
}

/// The files of the project's Python package (`python/`) that pip installs, with their text.
struct PythonPackage {
    files: Vec<(PathBuf, String)>,
}

impl PythonPackage {
    /// `pyproject.toml`, `README.md` (the package's description) and `presup/*.py`.
    fn read() -> PythonPackage {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("python");
        let mut paths = vec![PathBuf::from("pyproject.toml"), PathBuf::from("README.md")];
        let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("presup"))
            .unwrap()
            .map(|e| PathBuf::from("presup").join(e.unwrap().file_name()))
            .filter(|p| p.extension().is_some_and(|x| x == "py"))
            .collect();
        sources.sort();
        paths.extend(sources);
        let files = paths
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(root.join(&p)).unwrap();
                (p, text)
            })
            .collect();
        PythonPackage { files }
    }

    /// The part of the venv's stamp that says which package it holds: every file's text.
    fn stamp(&self) -> String {
        let mut out = String::new();
        for (path, text) in &self.files {
            out.push_str(&format!("\n# python/{}\n{text}", path.display()));
        }
        out
    }

    /// Writes the package's files under `dir` (emptied first); returns `dir`.
    fn copy_to(&self, dir: &Path) -> PathBuf {
        let _ = std::fs::remove_dir_all(dir);
        for (path, text) in &self.files {
            let to = dir.join(path);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::write(to, text).unwrap();
        }
        dir.to_path_buf()
    }
}

/// `PATH` with the tests' virtual environment first: what children of the tests run with.
pub fn path_with_venv() -> std::ffi::OsString {
    let mut dirs = vec![venv_bin()];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    std::env::join_paths(dirs).unwrap()
}

/// A `python3` command of the tests' virtual environment.
pub fn python3() -> Command {
    Command::new(venv_bin().join("python3"))
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

    /// Like [`Presup::start_program`], with extra environment.
    pub fn launch_program(dir: &Dir, program: &str, args: &[&str], env: &[(&str, &str)]) -> Presup {
        Presup::launch(dir, program, &[], args, env)
    }

    /// Starts the master on `<dir>/supervisor.toml` with its stderr given by the test (a pipe
    /// the test breaks, say): [`Presup::log`] then stays empty.
    pub fn start_with_stderr(dir: &Dir, stderr: Stdio) -> Presup {
        Presup::launch_to(dir, &dir.join("supervisor.toml"), bin(), &[], &[], &[], Some(stderr))
    }

    /// Starts the master on `config`, a config file elsewhere in `dir` (whose directory is then
    /// the children's): for a test that lays out several directories, as the examples are.
    pub fn start_config(dir: &Dir, config: &Path, env: &[(&str, &str)]) -> Presup {
        Presup::launch_to(dir, config, bin(), &[], &[], env, None)
    }

    fn launch(
        dir: &Dir,
        program: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Presup {
        Presup::launch_to(dir, &dir.join("supervisor.toml"), program, wrapper, args, env, None)
    }

    fn launch_to(
        dir: &Dir,
        config: &Path,
        program: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Option<Stdio>,
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
            .arg(config)
            .arg("--log-level")
            .arg("debug")
            .args(args)
            .current_dir(dir.path())
            .env("PATH", path_with_venv())
            .env_remove("WEB_CONCURRENCY")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd.stderr(stderr.unwrap_or_else(Stdio::piped));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn presup");
        let log = Log::default();
        MASTERS.with(|m| m.borrow_mut().push(Arc::downgrade(&log.inner)));
        match child.stderr.take() {
            Some(pipe) => log.clone().follow(pipe),
            None => log.close(),
        }
        Presup { child, log, status: None, pids_dir: dir.path().to_path_buf() }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The master's pid, from its first log line.
    pub fn master_pid(&self) -> i32 {
        pid_field(&self.log.wait_for("master started"))
    }

    /// The pid of the master's watcher (a child of the master that is not one of its
    /// workers, singletons or hooks), from its log.
    pub fn watcher_pid(&self) -> i32 {
        pid_field(&self.log.wait_for("watcher started"))
    }

    /// The pid of the `n`-th worker spawned in `slot` (counting from 1), from the log.
    pub fn worker_pid(&self, slot: usize, n: usize) -> i32 {
        pid_field(&self.log.wait_for_nth(&format!("worker spawned slot={slot} "), n))
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

/// The number of connections waiting to be accepted on the IPv4 listener on `port`: for a
/// listening socket, the `rx_queue` of `/proc/net/tcp`.
pub fn accept_queue(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{port:04X}");
    let listener = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f[1].ends_with(&local) && f[3] == "0A").then(|| f[4].to_owned()) // 0A: LISTEN
    });
    let queues = listener.unwrap_or_else(|| panic!("no listener on port {port}:\n{table}"));
    usize::from_str_radix(queues.split(':').nth(1).unwrap(), 16).unwrap()
}

/// A small tmpfs mounted for a test (root only), lazily unmounted when dropped. Declare it
/// after the test's [`Dir`], so that it is unmounted before the directory is removed.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`"64k"`) at `path` (created if needed); `Err` says why not
    /// (not root, no mount permission), for the test to skip with.
    pub fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Tmpfs { path: path.to_path_buf() })
    }

    /// Fills it: writes a file until the filesystem says ENOSPC.
    pub fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path.join("filler")).unwrap();
        let page = [0u8; 4096];
        loop {
            match f.write(&page) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
