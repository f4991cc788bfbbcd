//! Hostile input: random bytes and random mutations of a real config never make the loader
//! panic, and every rejection names a key or a position; and the mistakes operators make
//! (a config others can write while presup runs as root, a pidfile in a missing directory, a
//! Unix socket path that is too long, a user that does not exist, a worker command that is a
//! directory) end in a clear error before anything starts.
//!
//! The random inputs come from a fixed-seed generator, so a failure names its seed and
//! replays exactly.

mod common;

use std::path::Path;

use common::{run, Dir};
use presup::config::{self, ConfigError};

/// xorshift64*: small, fast, and reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A config that uses every section, valid as it is.
const FULL: &str = r#"pidfile = "run/presup.pid"
graceful_timeout = "10s"
umask = "027"

[[listen]]
name = "http"
address = "127.0.0.1:8000"
backlog = 128

[[listen]]
name = "admin"
address = "unix:run/admin.sock"

[workers]
command = ["python3", "app.py"]
count = "auto"
ready = "notify"
min_uptime = "1s"
boot_timeout = "30s"
watchdog = "10s"
stop_signal = "TERM"
restart_backoff = { initial = "100ms", max = "30s", reset = "10s" }
reload_batch = 2
env = { A = "1" }

[[hooks.on_starting]]
command = ["python3", "app.py", "register"]
timeout = "30s"
retries = 3
env = { B = "2" }

[hooks]
when_ready = [{ command = ["true"] }]

[[singleton]]
name = "flow"
command = ["python3", "flow.py"]
ready = { unix_socket = "run/flow.sock" }
restart = "on-failure"
stop_timeout = "5s"

[tickets.identify]
interval = "5s"
buckets = 16
daily_limit = 1000
daily_period = "24h"
http = "127.0.0.1:8090"
"#;

/// Values of every TOML type, and of the kinds the schema expects, some of them wrong.
const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "4294967296",
    "99999999999999999999",
    "1.5",
    "nan",
    "inf",
    "true",
    "\"\"",
    "\"auto\"",
    "\"5s\"",
    "\"-5s\"",
    "\"soon\"",
    "\"0ms\"",
    "\"unix:\"",
    "\"unix:/x\"",
    "\"127.0.0.1:0\"",
    "\"[::1]:80\"",
    "\"999.1.1.1:1\"",
    "\"TERM\"",
    "\"SIGKILL\"",
    "\"NOPE\"",
    "\"notify\"",
    "\"spawn\"",
    "[]",
    "[\"\"]",
    "[1, 2]",
    "[[]]",
    "{}",
    "{ tcp = \"x\" }",
    "{ unix_socket = 1 }",
    "1979-05-27T07:32:00Z",
    "\"\\u0000\"",
    "'''\nx'''",
    "\"é\"",
];

const NOISE: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "=",
    "\"",
    "'",
    "{",
    "}",
    ",",
    ".",
    "\n",
    "#",
    "\\",
    "[workers]",
    "[[listen]]",
    "[[singleton]]",
    "[hooks]",
    "[tickets.x]",
    "count",
    "name",
    "\u{feff}",
    "\0",
    "\r\n",
    "🦀",
    "a.b.c = 1\n",
];

/// One random change to `text`.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!("{text}{}", rng.pick(NOISE));
    }
    let i = rng.below(lines.len());
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    match rng.below(6) {
        // Replace a value with another of any type.
        0 | 1 => {
            if let Some((key, _)) = out[i].split_once(" = ") {
                out[i] = format!("{key} = {}", rng.pick(VALUES));
            }
        }
        // Delete a line.
        2 => {
            out.remove(i);
        }
        // Duplicate a line (duplicate keys, tables, array entries).
        3 => {
            let line = out[i].clone();
            out.insert(i, line);
        }
        // Insert noise somewhere in a line.
        4 => {
            let line = &out[i];
            let at = line.char_indices().map(|(k, _)| k).nth(rng.below(line.chars().count() + 1));
            let at = at.unwrap_or(line.len());
            out[i] = format!("{}{}{}", &line[..at], rng.pick(NOISE), &line[at..]);
        }
        // Cut the text short at a random byte on a char boundary.
        _ => {
            let joined = out.join("\n");
            let mut cut = rng.below(joined.len() + 1);
            while !joined.is_char_boundary(cut) {
                cut -= 1;
            }
            return joined[..cut].to_owned();
        }
    }
    out.join("\n")
}

/// Loads `text` as a config; panics (naming `what`) if the loader panics or rejects it
/// without naming a key or a position.
fn load(text: &str, what: &str) -> Result<config::Config, Vec<ConfigError>> {
    let path = Path::new("/nonexistent-presup-dir/supervisor.toml");
    let dir = Path::new("/nonexistent-presup-dir");
    let result = std::panic::catch_unwind(|| {
        config::parse_str(text, path, dir, None, 2, config::Launch::Exec)
    })
    .unwrap_or_else(|_| panic!("the loader panicked on {what}:\n{text:?}"));
    if let Err(errors) = &result {
        assert!(!errors.is_empty(), "{what}: rejected without an error:\n{text:?}");
        for e in errors {
            assert!(
                !e.key.is_empty() || e.line > 0,
                "{what}: an error names neither a key nor a position: {e}\n{text:?}"
            );
            assert!(!e.message.is_empty(), "{what}: an empty message\n{text:?}");
        }
    }
    result
}

#[test]
fn the_full_config_is_valid_to_begin_with() {
    let config = load(FULL, "FULL").unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(config.workers.count, 2, "auto is the CPU count given");
    assert!(toml::to_string_pretty(&config).is_ok());
}

#[test]
fn random_bytes_never_panic_and_every_rejection_is_located() {
    let mut rng = Rng(0x5eed_0001);
    for case in 0..cases(3000) {
        let len = rng.below(200);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let text = String::from_utf8_lossy(&bytes);
        let _ = load(&text, &format!("random bytes, case {case}"));
        // Printable ASCII, so that the TOML lexer gets further than its first byte.
        let printable: String =
            (0..len).map(|_| (b' ' + (rng.next() % 95) as u8) as char).collect();
        let _ = load(&printable, &format!("random printable text, case {case}"));
    }
}

#[test]
fn mutated_configs_never_panic_and_every_rejection_is_located() {
    let mut rng = Rng(0x5eed_0002);
    let (mut accepted, mut rejected) = (0, 0);
    for case in 0..cases(4000) {
        let mut text = FULL.to_owned();
        for _ in 0..1 + rng.below(4) {
            text = mutate(&mut rng, &text);
        }
        match load(&text, &format!("mutation case {case}")) {
            // What is accepted must also print (`presup check`).
            Ok(config) => {
                accepted += 1;
                toml::to_string_pretty(&config)
                    .unwrap_or_else(|e| panic!("case {case}: cannot print: {e}\n{text}"));
            }
            Err(_) => rejected += 1,
        }
    }
    // The generator explores both sides, or the test proves little.
    assert!(accepted > 100 && rejected > 1000, "accepted {accepted}, rejected {rejected}");
}

fn write_config(dir: &Dir, text: &str) {
    dir.script("worker.sh", "exec sleep 1000");
    dir.write("supervisor.toml", text);
}

const WORKERS: &str = "[workers]\ncommand = [\"./worker.sh\"]\ncount = 1\n";

#[test]
fn a_config_others_can_write_is_refused_when_presup_runs_as_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Dir::new();
    write_config(&dir, WORKERS);
    let file = dir.join("supervisor.toml");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, _, err) = run(&["check", "-c", "supervisor.toml"], dir.path());
    if nix::unistd::geteuid().is_root() {
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("writable by group or others (mode 0666)"), "{err}");
        assert!(err.contains("chmod go-w"), "{err}");
        // So is a file in a directory anyone can write to (and that is not sticky).
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let (code, _, err) = run(&["check", "-c", "supervisor.toml"], dir.path());
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("is writable by others (mode 0777)"), "{err}");
        // Sticky, like /tmp: fine.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let (code, _, err) = run(&["check", "-c", "supervisor.toml"], dir.path());
        assert_eq!(code, 0, "{err}");
    } else {
        // Not root: the config runs nothing with more rights than its writers have.
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn a_pidfile_in_a_missing_directory_exits_3_naming_the_directory() {
    let dir = Dir::new();
    write_config(&dir, &format!("pidfile = \"no-such-dir/presup.pid\"\n{WORKERS}"));
    let (code, _, err) = run(&["-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 3, "{err}");
    let missing = dir.join("no-such-dir");
    assert!(err.contains(&format!("its directory {} does not exist", missing.display())), "{err}");
    assert!(!err.contains("worker spawned"), "{err}");
}

#[test]
fn a_unix_socket_path_that_is_too_long_is_a_config_error() {
    let dir = Dir::new();
    let long = "s".repeat(120);
    write_config(
        &dir,
        &format!("[[listen]]\nname = \"a\"\naddress = \"unix:{long}.sock\"\n{WORKERS}"),
    );
    let (code, _, err) = run(&["-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("listen[0].address: line 3"), "{err}");
    assert!(err.contains("107"), "names the limit: {err}");
}

#[test]
fn a_user_that_does_not_exist_is_a_config_error() {
    let dir = Dir::new();
    write_config(&dir, &format!("user = \"no-such-user-presup-h\"\n{WORKERS}"));
    let (code, _, err) = run(&["-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("user: line 1, column 8: no such user \"no-such-user-presup-h\""),
        "{err}"
    );
}

#[test]
fn a_worker_command_that_is_a_directory_or_not_executable_is_a_config_error() {
    let dir = Dir::new();
    std::fs::create_dir(dir.join("app")).unwrap();
    dir.write("plain.sh", "exit 0\n");
    write_config(
        &dir,
        "[workers]\ncommand = [\"./app\"]\ncount = 1\n[[singleton]]\nname = \"s\"\ncommand = [\"./plain.sh\"]\n",
    );
    let (code, _, err) = run(&["-c", "supervisor.toml"], dir.path());
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("workers.command: line 2, column 11: \"./app\" is a directory"), "{err}");
    assert!(err.contains("singleton[0].command: line 6"), "{err}");
    assert!(err.contains("\"./plain.sh\" is not executable (chmod +x ./plain.sh)"), "{err}");
}

/// How many random cases a test tries: `n`, or `PRESUP_FUZZ_CASES` for a longer hunt.
fn cases(n: usize) -> usize {
    std::env::var("PRESUP_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(n)
}
