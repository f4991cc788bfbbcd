//! The config as the operator meets it: `presup check`, errors with line and column, exit 2
//! before anything starts, `count = "auto"` and `WEB_CONCURRENCY`.

mod common;

use common::{run, Dir, Presup};

#[test]
fn check_prints_the_resolved_config() {
    let dir = Dir::new();
    dir.write(
        "supervisor.toml",
        "[[listen]]\nname = \"http\"\naddress = \"unix:run/app.sock\"\n[workers]\ncommand = [\"python3\", \"app.py\"]\ncount = 3\n",
    );
    let (code, out, err) = run(&["check", "-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("count = 3"), "{out}");
    assert!(out.contains("graceful_timeout = \"30s\""), "defaults are filled in: {out}");
    let sock = dir.path().join("run/app.sock").display().to_string();
    assert!(out.contains(&format!("unix:{sock}")), "paths are absolute: {out}");
}

#[test]
fn every_error_is_reported_with_key_line_and_column_and_nothing_starts() {
    let dir = Dir::new();
    dir.script("worker.sh", "exec sleep 1000");
    let toml = r#"graceful_timeout = "soon"

[[listen]]
name = "http"
adress = "127.0.0.1:0"

[workers]
command = ["./worker.sh"]
count = "many"
"#;
    dir.write("supervisor.toml", toml);
    let (code, out, err) = run(&["check", "-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 2);
    assert!(out.is_empty());
    for want in [
        "graceful_timeout: line 1, column 20: invalid duration \"soon\"",
        "listen[0].adress: line 5, column 1: unknown key \"adress\"",
        "listen[0].address: line 3, column 1: missing required key \"address\"",
        "workers.count: line 9, column 9:",
    ] {
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
    // Running it: exit 2, and no child was ever started.
    let mut presup = Presup::start_with(&dir, &[], &[]);
    assert_eq!(presup.wait_exit(), Some(2));
    assert!(presup.log.text().contains("4 errors"), "{}", presup.log.text());
    assert!(dir.pids().is_empty());
}

#[test]
fn count_auto_is_the_cpu_count_and_web_concurrency_overrides() {
    let dir = Dir::new();
    dir.write("supervisor.toml", "[workers]\ncommand = [\"true\"]\ncount = \"auto\"\n");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let (code, out, _) = run(&["check"], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains(&format!("count = {cpus}")), "{out}");
    let out = std::process::Command::new(common::bin())
        .args(["check"])
        .current_dir(dir.path())
        .env("WEB_CONCURRENCY", "7")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("count = 7"));
    let out = std::process::Command::new(common::bin())
        .args(["check"])
        .current_dir(dir.path())
        .env("WEB_CONCURRENCY", "lots")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WEB_CONCURRENCY"));
}

#[test]
fn a_missing_config_file_is_a_usage_error() {
    let dir = Dir::new();
    let (code, _, err) = run(&["-c", "nope.toml"], dir.path());
    assert_eq!(code, 2);
    assert!(err.contains("nope.toml") && err.contains("cannot read"), "{err}");
    // A bad option is a usage error too, even with a valid config beside it.
    dir.write("supervisor.toml", "[workers]\ncommand = [\"true\"]\n");
    let (code, _, err) = run(&["check", "--log-format", "xml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--log-format") && err.contains("xml"), "{err}");
}

#[test]
fn ticket_sizes_beyond_a_file_are_config_errors() {
    let dir = Dir::new();
    dir.write(
        "supervisor.toml",
        "[workers]\ncommand = [\"true\"]\n[tickets.identify]\ninterval = \"5s\"\nbuckets = 100000\ndaily_limit = 2000000\n",
    );
    let (code, _, err) = run(&["check"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tickets.identify.buckets") && err.contains("line 5"), "{err}");
    assert!(err.contains("tickets.identify.daily_limit") && err.contains("line 6"), "{err}");
}

#[test]
fn check_refuses_a_count_above_the_bound_with_line_and_column() {
    let dir = Dir::new();
    dir.write("supervisor.toml", "[workers]\ncommand = [\"true\"]\ncount = 100000\n");
    let (code, _, err) = run(&["check"], dir.path());
    assert_eq!(code, 2, "{err}");
    let want = "workers.count: line 3, column 9: expected an integer from 0 to 1024, found 100000";
    assert!(err.contains(want), "{err}");
}

#[test]
fn check_refuses_a_nul_byte_in_an_argument_or_the_environment() {
    let dir = Dir::new();
    let toml = "[workers]\ncommand = [\"app\", \"a\\u0000b\"]\nenv = { K = \"\\u0000\" }\n";
    dir.write("supervisor.toml", toml);
    let (code, out, err) = run(&["check"], dir.path());
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert!(
        err.contains("workers.command[1]: line 2, column 19: \"a\\0b\" holds a NUL byte"),
        "{err}"
    );
    assert!(err.contains("workers.env.K: line 3, column 13:"), "{err}");
}

#[test]
fn check_of_a_config_in_a_directory_whose_name_is_not_utf8_prints_it_lossily() {
    use std::os::unix::ffi::OsStrExt;
    let dir = Dir::new();
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"conf-\xff"));
    std::fs::create_dir(&odd).unwrap();
    std::fs::write(odd.join("supervisor.toml"), "[workers]\ncommand = [\"true\"]\n").unwrap();
    let config = odd.join("supervisor.toml");
    let out = std::process::Command::new(common::bin())
        .arg("check")
        .arg("-c")
        .arg(&config)
        .env_remove("WEB_CONCURRENCY")
        .output()
        .unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("conf-\u{fffd}/supervisor.toml\""), "{stdout}");
    // An error in such a file is exit 2, the path printed the same way.
    std::fs::write(&config, "[workers]\ncommand = []\n").unwrap();
    let out = std::process::Command::new(common::bin()).args(["check", "-c"]).arg(&config).output();
    let out = out.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("conf-\u{fffd}/supervisor.toml: 1 error"));
}

#[test]
fn a_master_with_only_a_ticket_with_http_serves_it_and_stops_cleanly() {
    use std::io::{Read, Write};
    let dir = Dir::new();
    let mut presup =
        Presup::start(&dir, "[tickets.gateway]\ninterval = \"100ms\"\nhttp = \"127.0.0.1:0\"\n");
    let line = presup.log.wait_for("ticket server listening");
    let addr = line.split("address=").nth(1).unwrap().split_whitespace().next().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(common::DEADLINE)).unwrap();
    s.write_all(b"GET /?shard=0 HTTP/1.0\r\nHost: q\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"), "{answer}");
    assert!(answer.contains("free to connect"), "{answer}");
    presup.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(presup.wait_exit(), Some(0));
}
