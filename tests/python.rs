//! The Python client (`python/`, the `presup` package): its unittest suite
//! (`python/tests/test_*.py`), run by the tests' Python, whose virtual environment has the
//! package installed (`tests/common`: `venv_bin`).
//!
//! The suite plays the master itself (a socketpair, a child subreaper) against real stem
//! processes. It runs in a temp dir of its own, which is its `TMPDIR` too, with an environment
//! of its own (none of this machine's presup or systemd variables), so that it is independent
//! of every other test running meanwhile. Each process it starts carries `PRESUP_TEST_MARK`
//! with this test's value: none may be left once the suite has exited.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{alive, environ, kill_if_alive, var, Dir};
use nix::sys::signal::Signal;

/// How long the whole suite may take. Its own waits have deadlines (20 s each): this one only
/// keeps a hung suite from hanging the test run.
const SUITE_DEADLINE: Duration = Duration::from_secs(600);

/// The tests' Python with the environment of `dir` only: `PATH`, `TMPDIR`, the mark.
fn python_in(dir: &Dir) -> Command {
    let mut cmd = common::python3();
    cmd.current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TMPDIR", dir.path())
        .env("PRESUP_TEST_MARK", mark(dir))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null());
    cmd
}

fn mark(dir: &Dir) -> String {
    dir.path().display().to_string()
}

/// The live processes whose environment carries this test's mark.
fn marked(mark: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return vec![] };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| var(&environ(pid), "PRESUP_TEST_MARK") == Some(mark) && alive(pid))
        .collect()
}

#[test]
fn the_package_is_installed_in_the_venv() {
    let dir = Dir::new();
    let out = python_in(&dir)
        .args(["-c", "import presup; print(presup.__file__); print(presup.__version__)"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "import presup failed: {}", String::from_utf8_lossy(&out.stderr));
    let venv = common::venv_bin().parent().unwrap().to_path_buf();
    let mut lines = stdout.lines();
    let file = PathBuf::from(lines.next().unwrap());
    assert!(file.starts_with(&venv), "presup imported from {file:?}, not the venv {venv:?}");
    assert_eq!(lines.next(), Some("0.1.0"));
}

#[test]
fn python_unittest_suite() {
    let dir = Dir::new();
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests");
    // Into files, not pipes: a process the suite left behind would hold a pipe open.
    let output = |name: &str| Stdio::from(std::fs::File::create(dir.join(name)).unwrap());
    let mut child = python_in(&dir)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&tests)
        .arg("-t")
        .arg(&tests)
        .stdout(output("stdout"))
        .stderr(output("stderr"))
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (done, finished) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = done.send(());
        status
    });
    let timed_out = finished.recv_timeout(SUITE_DEADLINE).is_err();
    if timed_out {
        kill_if_alive(pid, Signal::SIGKILL);
    }
    let status = waiter.join().unwrap().unwrap();
    // Whatever the suite left behind (it checks that nothing is, test by test) is killed.
    let left = marked(&mark(&dir));
    for &p in &left {
        kill_if_alive(p, Signal::SIGKILL);
    }
    let output = format!("--- stdout\n{}--- stderr\n{}", dir.read("stdout"), dir.read("stderr"));
    assert!(!timed_out, "the Python suite did not end within {SUITE_DEADLINE:?}\n{output}");
    assert!(status.success(), "python -m unittest failed ({status})\n{output}");
    assert!(left.is_empty(), "processes outlived the Python suite: {left:?}\n{output}");
    // Shown with --no-capture: which tests ran.
    println!("{output}");
}
