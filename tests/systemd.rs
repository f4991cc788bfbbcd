//! The master under systemd: what a (fake) systemd hears on `NOTIFY_SOCKET` at start, reload,
//! failed reload and stop, the watchdog pings and timeout extensions, and socket activation
//! with the real `systemd-socket-activate`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{environ, free_port, kill, wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

const WORKER: &str = "exec sleep 1000";

fn config(command: &str, extra: &str) -> String {
    format!(
        "graceful_timeout = \"5s\"\n{extra}\n[workers]\ncommand = [\"{command}\"]\ncount = 2\nmin_uptime = \"100ms\"\n"
    )
}

/// systemd's end of `NOTIFY_SOCKET`: a datagram socket in the test's dir.
struct FakeSystemd {
    socket: UnixDatagram,
    path: PathBuf,
}

impl FakeSystemd {
    fn new(dir: &Dir) -> FakeSystemd {
        let path = dir.join("systemd-notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        FakeSystemd { socket, path }
    }

    fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().unwrap())
    }

    /// The next datagram, or `None` after `wait`.
    fn recv(&self, wait: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Every datagram up to and including the first that has a line starting with `line`.
    fn until(&self, line: &str) -> Vec<String> {
        let end = Instant::now() + DEADLINE;
        let mut got = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let Some(m) = self.recv(left.max(Duration::from_millis(1))) else {
                panic!("systemd never heard {line:?}; it heard {got:?}")
            };
            let done = m.lines().any(|l| l.starts_with(line));
            got.push(m);
            if done {
                return got;
            }
        }
    }
}

/// The messages that are not a plain status update or a timeout extension.
fn events(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .filter(|m| {
            !m.lines().all(|l| l.starts_with("STATUS=") || l.starts_with("EXTEND_TIMEOUT_USEC="))
        })
        .cloned()
        .collect()
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

/// A reload announcement: `RELOADING=1` and a `MONOTONIC_USEC=` between `before` and now.
fn assert_reloading(message: &str, before: u64) {
    let mut lines = message.lines();
    assert_eq!(lines.next(), Some("RELOADING=1"), "{message:?}");
    let usec: u64 =
        lines.next().and_then(|l| l.strip_prefix("MONOTONIC_USEC=")).unwrap().parse().unwrap();
    assert!(before <= usec && usec <= monotonic_usec(), "{usec} not in [{before}, now]");
}

#[test]
fn systemd_hears_ready_reloading_ready_and_stopping_at_the_right_moments() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    dir.script("fails.sh", "exit 1");
    let good = config("./worker.sh", "");
    dir.write("supervisor.toml", &good);
    let systemd = FakeSystemd::new(&dir);
    let mut presup = Presup::start_with(&dir, &[], &[systemd.env()]);

    // Start: one READY=1, when both workers are up, with the counts.
    let start = systemd.until("READY=1");
    assert_eq!(events(&start), ["READY=1\nSTATUS=2/2 workers, 0/0 singletons, generation 1"]);
    // (The log line is written before the datagram, but read by another thread.)
    presup.log.wait_for("ready: all workers up");

    // A good reload: RELOADING=1 at the HUP, READY=1 once generation 2 is rolled out.
    let before = monotonic_usec();
    presup.signal(Signal::SIGHUP);
    let reload = events(&systemd.until("READY=1"));
    assert_eq!(reload.len(), 2, "{reload:?}");
    assert_reloading(&reload[0], before);
    assert_eq!(reload[1], "READY=1\nSTATUS=2/2 workers, 0/0 singletons, generation 2");
    presup.log.wait_for("reload done");

    // A reload to a command that exits at once: undone, and systemd is told so.
    dir.write("supervisor.toml", &config("./fails.sh", ""));
    let before = monotonic_usec();
    presup.signal(Signal::SIGHUP);
    let undone = events(&systemd.until("READY=1"));
    assert_eq!(undone.len(), 2, "{undone:?}");
    assert_reloading(&undone[0], before);
    assert!(
        undone[1].starts_with(
            "READY=1\nSTATUS=2/2 workers, 0/0 singletons, generation 2; reload to generation 3 undone: slot "
        ),
        "{undone:?}"
    );

    // An invalid config: rejected at once, nothing changes.
    dir.write("supervisor.toml", &good.replace("count = 2", "count = \"many\""));
    let before = monotonic_usec();
    presup.signal(Signal::SIGHUP);
    let rejected = events(&systemd.until("READY=1"));
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_reloading(&rejected[0], before);
    assert_eq!(
        rejected[1],
        "READY=1\nSTATUS=2/2 workers, 0/0 singletons, generation 2; reload rejected: 1 error(s) in the new config"
    );

    // Stop: STOPPING=1, then nothing but status updates.
    presup.signal(Signal::SIGTERM);
    let stop = systemd.until("STOPPING=1");
    assert_eq!(events(&stop), ["STOPPING=1"]);
    assert_eq!(presup.wait_exit(), Some(0));
    let mut rest = Vec::new();
    while let Some(m) = systemd.recv(Duration::from_millis(1)) {
        rest.push(m);
    }
    assert!(events(&rest).is_empty(), "after STOPPING=1: {rest:?}");
}

#[test]
fn the_watchdog_is_pinged_at_half_its_interval_and_a_long_start_extends_the_timeout() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    // An on_starting hook that outlasts one extension period.
    dir.script("slow-hook.sh", "sleep 2.5");
    let hook = "[[hooks.on_starting]]\ncommand = [\"./slow-hook.sh\"]\ntimeout = \"20s\"\n";
    dir.write("supervisor.toml", &config("./worker.sh", hook));
    let systemd = FakeSystemd::new(&dir);
    let presup = Presup::start_with(&dir, &[], &[systemd.env(), ("WATCHDOG_USEC", "400000")]);

    let start = systemd.until("READY=1");
    assert!(
        start.iter().any(|m| m == "EXTEND_TIMEOUT_USEC=10000000"),
        "a 2.5 s start extends systemd's timeout: {start:?}"
    );
    let pings_at_start = start.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings_at_start >= 4, "pings every 200 ms while starting: {start:?}");
    // Then, while idle, pings go on at half of WATCHDOG_USEC, and no more extensions.
    let begin = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        let m = systemd.recv(DEADLINE).expect("a watchdog ping");
        assert_ne!(m.split('=').next(), Some("EXTEND_TIMEOUT_USEC"), "{m}");
        pings += (m == "WATCHDOG=1") as usize;
    }
    let took = begin.elapsed();
    assert!(took >= Duration::from_millis(700), "5 pings in {took:?}: faster than every 200 ms");
    drop(presup);
}

#[test]
fn a_watchdog_meant_for_another_pid_is_not_pinged() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    dir.write("supervisor.toml", &config("./worker.sh", ""));
    let systemd = FakeSystemd::new(&dir);
    let env = [systemd.env(), ("WATCHDOG_USEC", "100000"), ("WATCHDOG_PID", "1")];
    let presup = Presup::start_with(&dir, &[], &env);
    let start = systemd.until("READY=1");
    assert!(!start.iter().any(|m| m == "WATCHDOG=1"), "{start:?}");
    // No ping in five of the would-be intervals.
    let end = Instant::now() + Duration::from_millis(500);
    while let Some(m) = systemd.recv(end.saturating_duration_since(Instant::now())) {
        assert_ne!(m, "WATCHDOG=1");
        if Instant::now() >= end {
            break;
        }
    }
    drop(presup);
}

/// Waits for the master started by a wrapper, and records its pid for the leak check.
fn wrapped_master(dir: &Dir, presup: &Presup) -> i32 {
    let pid = presup.master_pid();
    dir.record_pid(pid);
    pid
}

#[test]
fn socket_activation_adopts_sockets_by_name_or_address_and_binds_the_rest() {
    let dir = Dir::new();
    let app = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo/app.py");
    let port = free_port();
    let admin = dir.join("admin.sock");
    let toml = format!(
        r#"graceful_timeout = "5s"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"
[[listen]]
name = "admin"
address = "unix:{admin}"
[[listen]]
name = "extra"
address = "127.0.0.1:0"
[workers]
command = ["python3", "{app}"]
count = 2
min_uptime = "100ms"
"#,
        admin = admin.display()
    );
    dir.write("supervisor.toml", &toml);
    let tcp = format!("127.0.0.1:{port}");
    // fd 3 is matched by its name, fd 4 (named "other") by its address.
    let wrapper = [
        "systemd-socket-activate",
        "-l",
        &tcp,
        "-l",
        admin.to_str().unwrap(),
        "--fdname=http:other",
    ];
    let mut presup = Presup::start_via(&dir, &wrapper, &[], &[]);
    // systemd-socket-activate starts presup on the first connection, which waits in the
    // backlog of the activated socket until a worker takes it: the first request is served.
    presup.log.wait_for("Listening on");
    let body = wait_until("an answer through the activated socket", DEADLINE, || {
        common::http_get(port).ok()
    });
    assert!(body.starts_with("slot ") && body.contains("generation 1"), "{body}");
    let master = wrapped_master(&dir, &presup);

    let log = presup.log.text();
    for (name, by) in [("http", "systemd"), ("admin", "systemd"), ("extra", "presup")] {
        assert!(
            presup
                .log
                .lines()
                .iter()
                .any(|l| l.contains(&format!("name={name} "))
                    && l.contains(&format!("bound_by={by}"))),
            "{name} bound by {by}:\n{log}"
        );
    }
    // The workers get presup's view: three listeners, their own LISTEN_PID, presup's own
    // NOTIFY_SOCKET, and none of what systemd-socket-activate gave the master.
    presup.log.wait_for("ready: all workers up");
    let worker: i32 = body.split_whitespace().nth(3).unwrap().parse().unwrap();
    let env = environ(worker);
    let get = |k: &str| common::var(&env, k);
    assert_eq!(get("LISTEN_FDS"), Some("3"));
    assert_eq!(get("LISTEN_FDNAMES"), Some("http:admin:extra"));
    assert_eq!(get("LISTEN_PID"), Some(worker.to_string().as_str()));
    assert_eq!(get("PRESUP_MASTER_PID"), Some(master.to_string().as_str()));
    assert!(get("NOTIFY_SOCKET").is_some_and(|p| p.contains(&format!("presup-{master}-"))));
    // presup sets TCP_NODELAY on TCP sockets systemd passed too (fd 3: "http"), and on its own.
    assert!(tcp_nodelay_of(worker, 3), "the inherited TCP listener has no TCP_NODELAY");
    assert!(tcp_nodelay_of(worker, 5), "the bound TCP listener has no TCP_NODELAY");

    kill(master, Signal::SIGTERM);
    presup.log.wait_for("master stopped");
    assert_eq!(presup.wait_exit(), Some(0));
    assert!(admin.exists(), "presup never unlinks a socket file systemd created");
}

/// Whether the TCP socket at `fd` of process `pid` has `TCP_NODELAY`, read through a copy of
/// the fd (`pidfd_getfd`, which needs the right to ptrace `pid`: the test's own children).
#[allow(unsafe_code)] // The raw pidfd syscalls, to read a socket's option in a child.
fn tcp_nodelay_of(pid: i32, fd: i32) -> bool {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain syscalls with integer arguments; each returned fd is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    use std::os::fd::AsRawFd;
    // SAFETY: as above.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    assert!(copy >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
    nix::sys::socket::getsockopt(&copy, nix::sys::socket::sockopt::TcpNoDelay).unwrap()
}

#[test]
fn an_activated_socket_that_matches_no_listener_is_an_error() {
    let dir = Dir::new();
    dir.script("worker.sh", WORKER);
    let port = free_port();
    dir.write(
        "supervisor.toml",
        &config("./worker.sh", "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n"),
    );
    let tcp = format!("127.0.0.1:{port}");
    let wrapper = ["systemd-socket-activate", "-l", &tcp, "--fdname=stray"];
    let mut presup = Presup::start_via(&dir, &wrapper, &[], &[]);
    presup.log.wait_for("Listening on");
    // The connection that makes systemd-socket-activate start presup.
    let _trigger = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let line = presup.log.wait_for("matches no [[listen]]");
    assert!(line.contains("fd 3") && line.contains("\"stray\"") && line.contains(&tcp), "{line}");
    assert_eq!(presup.wait_exit(), Some(3));
    assert_eq!(presup.log.count("worker spawned"), 0);
}

#[test]
fn the_example_units_pass_systemd_analyze_verify() {
    let dir = Dir::new();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/systemd");
    for unit in ["presup-demo.service", "presup-demo.socket"] {
        let text = std::fs::read_to_string(format!("{examples}/{unit}")).unwrap();
        // The binary and directory of this checkout, where the unit says /usr/local, /opt.
        let text = text.replace("/usr/local/bin/presup", common::bin()).replace(
            "WorkingDirectory=/opt/presup",
            concat!("WorkingDirectory=", env!("CARGO_MANIFEST_DIR")),
        );
        dir.write(unit, &text);
    }
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no", "./presup-demo.socket", "./presup-demo.service"])
        .current_dir(dir.path())
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
}

#[test]
fn a_workers_status_text_reaches_systemds_status_line() {
    let dir = Dir::new();
    // The datagram comes from the worker process itself (python3 replaces the shell).
    dir.script(
        "worker.sh",
        "exec python3 -c \"import os, socket, time\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.sendto(b'STATUS=serving 42 requests', os.environ['NOTIFY_SOCKET'])\ntime.sleep(1000)\"",
    );
    dir.write("supervisor.toml", &config("./worker.sh", "").replace("count = 2", "count = 1"));
    let systemd = FakeSystemd::new(&dir);
    let presup = Presup::start_with(&dir, &[], &[systemd.env()]);
    systemd
        .until("STATUS=1/1 workers, 0/0 singletons, generation 1; slot 0: \"serving 42 requests\"");
    drop(presup);
}
