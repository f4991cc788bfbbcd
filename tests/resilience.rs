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
