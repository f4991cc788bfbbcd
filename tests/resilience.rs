//! The master under hostile conditions: a broken log, a config that is not a file, floods of
//! notifications, a process limit; it keeps running, answers signals, and says why.

mod common;

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};

use common::{alive, wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

const ONE_WORKER: &str = r#"graceful_timeout = "2s"
[workers]
command = ["./worker.sh"]
count = 1
min_uptime = "10ms"
"#;

#[test]
fn a_log_pipe_whose_reader_exited_does_not_stop_the_master() {
    let dir = Dir::new();
    dir.script("worker.sh", "exec sleep 1000");
    dir.write("supervisor.toml", ONE_WORKER);
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut presup = Presup::start_with_stderr(&dir, Stdio::from(write));
    // The reader takes the first line and exits: the pipe has no reader left.
    let mut reader = Command::new("head")
        .args(["-n", "1"])
        .stdin(Stdio::from(read))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    assert!(reader.wait().unwrap().success());
    let first = wait_until("the first worker", DEADLINE, || dir.pids().first().copied());
    // Every line the master logs from now on fails with EPIPE.
    presup.signal(Signal::SIGTTIN);
    let second = wait_until("a second worker after TTIN", DEADLINE, || dir.pids().get(1).copied());
    presup.signal(Signal::SIGTTOU);
    wait_until("the TTOU'd worker to stop", DEADLINE, || (!alive(second)).then_some(()));
    assert!(alive(presup.pid()), "the master died of its log");
    assert!(alive(first), "the first worker died with its master");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn a_log_pipe_nobody_reads_does_not_block_the_master() {
    let dir = Dir::new();
    dir.script("worker.sh", "exec sleep 1000");
    dir.write("supervisor.toml", ONE_WORKER);
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // The smallest pipe the kernel makes (a page): a few dozen log lines fill it. The test
    // keeps the read end open and never reads, like a stopped `less` or a stalled shipper.
    nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let mut presup = Presup::start_with_stderr(&dir, Stdio::from(write));
    let first = wait_until("the first worker", DEADLINE, || dir.pids().first().copied());
    // Each TTIN and TTOU logs a few lines (debug level): far more than the pipe holds.
    for n in 2..=40 {
        presup.signal(Signal::SIGTTIN);
        let pid = wait_until(&format!("worker {n} after TTIN"), DEADLINE, || {
            dir.pids().get(n - 1).copied()
        });
        // TTIN and TTOU pending at once would cancel out: each waits for the last's effect.
        presup.signal(Signal::SIGTTOU);
        wait_until(&format!("worker {n} to stop after TTOU"), DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
    assert!(alive(first), "the first worker died");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
    drop(read);
}

fn mkfifo(path: &std::path::Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn a_config_replaced_by_a_fifo_is_a_rejected_reload_and_term_still_stops_at_once() {
    let dir = Dir::new();
    dir.script("worker.sh", "exec sleep 1000");
    let mut presup = Presup::start(&dir, ONE_WORKER);
    presup.log.wait_for("worker spawned");
    let config = dir.join("supervisor.toml");
    std::fs::remove_file(&config).unwrap();
    mkfifo(&config);
    presup.signal(Signal::SIGHUP);
    let line = presup.log.wait_for("reload rejected");
    assert!(line.contains("a FIFO; the config must be a regular file"), "{line}");
    presup.log.wait_for("keeping the running one");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn a_config_that_is_a_fifo_exits_2_at_start() {
    let dir = Dir::new();
    mkfifo(&dir.join("supervisor.toml"));
    let mut presup = Presup::start_with(&dir, &[], &[]);
    assert_eq!(presup.wait_exit(), Some(2));
    assert!(presup.log.text().contains("a FIFO; the config must be a regular file"));
}

/// Lines of the log that contain every one of `needles`.
fn count_all(presup: &Presup, needles: &[&str]) -> usize {
    presup.log.lines().iter().filter(|l| needles.iter().all(|n| l.contains(n))).count()
}

#[test]
fn the_last_status_of_a_quick_burst_is_logged_once_its_second_is_over() {
    let dir = Dir::new();
    dir.script(
        "worker.sh",
        r#"exec python3 -c "
import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for status in (b'loading', b'warming', b'ready'):
    s.sendto(b'STATUS=' + status, os.environ['NOTIFY_SOCKET'])
time.sleep(1000)
""#,
    );
    let mut presup = Presup::start(&dir, ONE_WORKER);
    presup.log.wait_for("status=loading");
    // Nothing more comes from the worker: the master's own deadline shows where it ended.
    let ready = presup.log.wait_for("status=ready");
    assert!(ready.contains("(1 more changes in between not logged)"), "{ready}");
    assert_eq!(presup.log.count("status=warming"), 0);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn a_flood_of_status_updates_is_logged_once_a_second_with_the_rest_counted() {
    let dir = Dir::new();
    // 100000 different STATUS= from the worker itself, then (over a second later) a last one.
    dir.script(
        "worker.sh",
        r#"exec python3 -c "
import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(100000):
    s.sendto(b'STATUS=flood %d' % i, os.environ['NOTIFY_SOCKET'])
open('flooded', 'w').close()
time.sleep(1.2)
s.sendto(b'STATUS=last', os.environ['NOTIFY_SOCKET'])
time.sleep(1000)
""#,
    );
    let began = std::time::Instant::now();
    let mut presup = Presup::start(&dir, ONE_WORKER);
    let worker = wait_until("the worker", DEADLINE, || dir.pids().first().copied());
    let pid = format!("pid={worker}");
    let last = presup.log.wait_for("status=last");
    let took = began.elapsed();
    assert!(dir.join("flooded").exists());
    // The flood's held-back changes are counted on a status line (the flood's last status,
    // logged once its second was over, or "last").
    let counted = presup.log.count("more changes in between not logged");
    assert!(counted >= 1, "{last}\n{}", presup.log.text());
    let lines = count_all(&presup, &["INFO status", &pid]);
    let bytes = presup.log.text().len();
    eprintln!("100000 STATUS= datagrams in {took:?}: {lines} status lines, {bytes} bytes of log");
    // One line per second at most, the first at once, and the last.
    assert!(lines as u64 <= took.as_secs() + 2, "{lines} status lines in {took:?}");
    assert!(bytes < 20_000, "{bytes} bytes of log");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

#[test]
fn notifications_from_a_process_that_is_not_a_child_are_warned_of_once_naming_its_pid() {
    let dir = Dir::new();
    // The worker's own child (not the worker) sends READY=1, 1000 times.
    dir.script(
        "worker.sh",
        r#"python3 -c "
import os, socket
open('sender', 'w').write(str(os.getpid()))
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for i in range(1000):
    s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])
"
echo sent > sent
exec sleep 1000"#,
    );
    let toml = ONE_WORKER.replace("min_uptime", "ready = \"notify\"\nmin_uptime");
    let mut presup = Presup::start(&dir, &toml);
    wait_until("the sender", DEADLINE, || dir.join("sent").exists().then_some(()));
    let sender = dir.read("sender");
    let debug = "notification from a process that is not a child; ignored";
    presup.log.wait_for_nth(debug, 1000);
    let warned = "which is not a worker or singleton of this master";
    assert_eq!(count_all(&presup, &["WARN", warned]), 1, "{}", presup.log.text());
    let line = presup.log.wait_for(warned);
    assert!(line.contains(&format!("from pid {sender},")), "{line}");
    assert!(line.contains("(READY=1)") && line.contains("--pid=$$"), "{line}");
    assert_eq!(presup.log.count("worker up (READY=1)"), 0);
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}

/// The uid and gid of a system user made for one test, created if missing; `None` (with the
/// reason printed) when the test cannot make one.
fn test_user(name: &str) -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to create the unprivileged user {name}");
        return None;
    }
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        let made = Command::new("useradd").args(["--system", "--no-create-home", name]).status();
        // Another test may have created it meanwhile.
        if !made.is_ok_and(|s| s.success())
            && nix::unistd::User::from_name(name).ok().flatten().is_none()
        {
            eprintln!("skipped: cannot create the user {name} (useradd failed)");
            return None;
        }
    }
    let user = nix::unistd::User::from_name(name).ok().flatten()?;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

/// The CPU time (user + system) of `pid` so far.
fn cpu_time(pid: i32) -> std::time::Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap().unwrap() as u64;
    std::time::Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn at_the_process_limit_the_whole_pool_backs_off_with_one_line_per_backoff() {
    // root ignores RLIMIT_NPROC: the master runs as an unprivileged user, limited to 6
    // processes (the master and 5 workers) of the 20 it wants.
    let Some((uid, gid)) = test_user("presup-nproc") else { return };
    let dir = Dir::new();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir.script("worker.sh", "exec sleep 1000");
    dir.write(
        "supervisor.toml",
        r#"graceful_timeout = "2s"
[workers]
command = ["./worker.sh"]
count = 20
min_uptime = "10ms"
restart_backoff = { initial = "100ms", max = "30s", reset = "10s" }
"#,
    );
    let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={gid}"));
    let as_user = ["setpriv", &reuid, &regid, "--clear-groups", "prlimit"];
    let wrapper = [&as_user[..], &["--nproc=6:1000"]].concat();
    let mut presup = Presup::start_via(&dir, &wrapper, &[], &[]);
    let master = presup.master_pid();
    let cpu_before = cpu_time(master);
    let began = std::time::Instant::now();
    // The 4th backoff in a row comes 100 + 200 + 400 ms after the first.
    let waits = "every worker spawn waits";
    presup.log.wait_for(&format!("{waits} 800ms"));
    let (took, cpu) = (began.elapsed(), cpu_time(master) - cpu_before);
    let failures = presup.log.count("cannot start worker");
    eprintln!("{failures} fork failures logged in {took:?}; the master used {cpu:?} of CPU");
    assert_eq!(failures, presup.log.count(waits), "one line per backoff:\n{}", presup.log.text());
    assert!(failures <= 5, "{}", presup.log.text());
    assert!(cpu < took / 4, "the master used {cpu:?} of CPU in {took:?}");
    assert!(alive(master), "the master gave up");
    // Once the limit is lifted (by the same user, up to the hard limit), the pause ends and
    // every slot is filled.
    let lifted = Command::new(as_user[0])
        .args(&as_user[1..])
        .args(["--pid", &master.to_string(), "--nproc=1000"])
        .status()
        .unwrap();
    assert!(lifted.success());
    presup.log.wait_for("ready: all workers up");
    wait_until("20 workers", DEADLINE, || (dir.pids().len() == 20).then_some(()));
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}
