//! A master running as root, with children or directories of an unprivileged user: what
//! crosses the line between them. Every test here needs root and skips (saying so) without.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::{wait_until, Dir, Presup, DEADLINE};
use nix::sys::signal::Signal;

/// Whether this test may run: root, with the users `nobody` and `daemon`.
fn root(test: &str) -> bool {
    let users = ["nobody", "daemon"]
        .iter()
        .all(|u| nix::unistd::User::from_name(u).ok().flatten().is_some());
    let ok = nix::unistd::Uid::effective().is_root() && users;
    if !ok {
        eprintln!("skipped {test}: needs root and the users nobody and daemon");
    }
    ok
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Lets `nobody` run the test's scripts and record its pids, and gives it `shared/` to write.
fn open_to_nobody(dir: &Dir) {
    chmod(dir.path(), 0o755);
    std::fs::write(dir.join("pids"), "").unwrap();
    chmod(&dir.join("pids"), 0o666);
    std::fs::create_dir(dir.join("shared")).unwrap();
    chmod(&dir.join("shared"), 0o777);
}

/// Sends `READY=1` to `$NOTIFY_SOCKET` from the calling process.
const SEND: &str = "import os, socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])";

#[test]
fn children_of_user_can_notify_the_master_and_other_users_cannot() {
    if !root("children_of_user_can_notify_the_master_and_other_users_cannot") {
        return;
    }
    let dir = Dir::new();
    open_to_nobody(&dir);
    let script = dir.script(
        "worker.sh",
        &format!(
            "echo \"$NOTIFY_SOCKET\" > shared/socket\n\"{}\" ticket t || exit 1\n\
             exec python3 -c \"{SEND}\nimport time\ntime.sleep(1000)\"",
            common::bin()
        ),
    );
    // The ticket in the runtime directory: reached by the children as well.
    let toml = format!(
        "user = \"nobody\"\n[workers]\ncommand = [\"{}\"]\ncount = 2\nready = \"notify\"\n\n\
         [tickets.t]\ninterval = \"1ms\"\n",
        script.display()
    );
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    assert_eq!(presup.log.count("worker up (READY=1)"), 2);
    let socket = wait_until("the socket's path", DEADLINE, || {
        Some(dir.read("shared/socket")).filter(|s| s.ends_with('\n'))
    });
    let socket = Path::new(socket.trim());
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let (s, d) =
        (std::fs::metadata(socket).unwrap(), std::fs::metadata(socket.parent().unwrap()).unwrap());
    assert_eq!((s.uid(), s.mode() & 0o7777), (nobody.uid.as_raw(), 0o600), "the socket");
    assert_eq!(
        (d.uid(), d.gid(), d.mode() & 0o7777),
        (0, nobody.gid.as_raw(), 0o710),
        "its directory"
    );
    // Another unprivileged user cannot even reach it.
    let out = Command::new("setpriv")
        .args([
            "--reuid=daemon",
            "--regid=daemon",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            SEND,
        ])
        .env("NOTIFY_SOCKET", socket)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("PermissionError"), "{err}");
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}
