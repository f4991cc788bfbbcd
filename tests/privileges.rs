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

/// Runs the master on `toml` until it exits; asserts exit 3 and returns its log.
fn refused(dir: &Dir, toml: &str) -> String {
    let mut presup = Presup::start(dir, toml);
    assert_eq!(presup.wait_exit(), Some(3), "log:\n{}", presup.log.text());
    presup.log.text()
}

#[test]
fn a_root_master_follows_no_symlink_at_the_pidfile_or_a_ticket_path() {
    if !root("a_root_master_follows_no_symlink_at_the_pidfile_or_a_ticket_path") {
        return;
    }
    let dir = Dir::new();
    let script = dir.script("worker.sh", "exec sleep 60");
    let workers = format!("[workers]\ncommand = [\"{}\"]\ncount = 1\n", script.display());
    // A directory an unprivileged user owns (RuntimeDirectory= with User=), and files of root's.
    let planted = dir.join("planted");
    std::fs::create_dir(&planted).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&planted, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let victim = dir.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious"), "precious\n").unwrap();
    let plant = |name: &str, target: &str| {
        let link = planted.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(victim.join(target), &link).unwrap();
        // Planted by its owner, as it would be.
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &link,
            Some(nobody.uid),
            Some(nobody.gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .unwrap();
        link
    };
    for target in ["new", "precious"] {
        let link = plant("presup.pid", target);
        let text = refused(&dir, &format!("pidfile = \"{}\"\n{workers}", link.display()));
        assert!(text.contains(&format!("pidfile {}: a symbolic link", link.display())), "{text}");
        let link = plant("t.ticket", target);
        let ticket =
            format!("{workers}\n[tickets.t]\ninterval = \"1s\"\npath = \"{}\"\n", link.display());
        let text = refused(&dir, &ticket);
        assert!(text.contains(&format!("ticket {}: a symbolic link", link.display())), "{text}");
    }
    assert!(!victim.join("new").exists(), "root created the symlink's target");
    assert_eq!(std::fs::read_to_string(victim.join("precious")).unwrap(), "precious\n");
    let left: Vec<_> =
        std::fs::read_dir(&planted).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 2, "only the planted links: {left:?}");
}

#[test]
fn a_root_master_refuses_a_pidfile_or_ticket_directory_others_can_write() {
    if !root("a_root_master_refuses_a_pidfile_or_ticket_directory_others_can_write") {
        return;
    }
    let dir = Dir::new();
    let script = dir.script("worker.sh", "exec sleep 60");
    let workers = format!("[workers]\ncommand = [\"{}\"]\ncount = 1\n", script.display());
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    for (mode, who) in [(0o777, "group and others (mode 0777)"), (0o775, "group (mode 0775)")] {
        chmod(&open, mode);
        let why = format!(
            "its directory {} is writable by {who} while presup runs as root",
            open.display()
        );
        let text = refused(&dir, &format!("pidfile = \"open/presup.pid\"\n{workers}"));
        assert!(
            text.contains(&format!("pidfile {}: {why}", open.join("presup.pid").display())),
            "{text}"
        );
        let ticket =
            format!("{workers}\n[tickets.t]\ninterval = \"1s\"\npath = \"open/t.ticket\"\n");
        let text = refused(&dir, &ticket);
        assert!(text.contains(&why) && text.contains("ticket t: state file"), "{text}");
        assert_eq!(std::fs::read_dir(&open).unwrap().count(), 0, "a file was made in it");
    }
    // Sticky and root's, like /tmp: others cannot remove or rename the master's files.
    chmod(&open, 0o1777);
    let toml = format!("pidfile = \"open/presup.pid\"\n{workers}\n[tickets.t]\ninterval = \"1s\"\npath = \"open/t.ticket\"\n");
    let mut presup = Presup::start(&dir, &toml);
    presup.log.wait_for("ready: all workers up");
    assert!(open.join("presup.pid").exists() && open.join("t.ticket").exists());
    presup.signal(Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}
