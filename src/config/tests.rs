//! Tests of the whole config module: text in, resolved [`Config`] or exact errors out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal::{SIGINT, SIGQUIT, SIGTERM};

use super::*;

const FILE: &str = "/etc/presup/supervisor.toml";
const DIR: &str = "/etc/presup";

fn parse_with(text: &str, web_concurrency: Option<&str>) -> Result<Config, Vec<ConfigError>> {
    parse_str(text, Path::new(FILE), Path::new(DIR), web_concurrency, 8, Launch::Exec)
}

fn parse(text: &str) -> Config {
    parse_with(text, None).unwrap_or_else(|errors| panic!("unexpected errors: {errors:#?}"))
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse_with(text, None) {
        Ok(config) => panic!("expected errors, parsed {config:#?}"),
        Err(errors) => errors,
    }
}

fn error(key: &str, line: usize, column: usize, message: &str) -> ConfigError {
    ConfigError { key: key.to_owned(), line, column, message: message.to_owned() }
}

/// The one error of `text`.
fn only_error(text: &str) -> ConfigError {
    let mut all = errors(text);
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

/// The errors of `text` as `presup check` prints them: `key: line L, column C: message`.
fn printed(text: &str) -> Vec<String> {
    errors(text).iter().map(ToString::to_string).collect()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

const FULL: &str = r#"
pidfile = "run/presup.pid"
graceful_timeout = "20s"
directory = "app"
user = "root"
group = "root"
umask = "0027"

[[listen]]
name = "http"
address = "127.0.0.1:8000"

[[listen]]
name = "admin.v6"
address = "[::1]:9000"
backlog = 64

[[listen]]
name = "sock"
address = "unix:./run/app.sock"

[workers]
command = ["python3", "app.py"]
count = 4
env = { APP_ENV = "production" }
ready = "notify"
min_uptime = "500ms"
boot_timeout = "10s"
watchdog = "5s"
stop_signal = "SIGINT"
restart_backoff = { initial = "50ms", max = "1m" }
boot_attempts = 3
reload_batch = 2
forward_signals = ["USR1"]

[hooks]
on_starting = [
    { command = ["python3", "app.py", "register"], timeout = "90s", retries = 3, env = { X = "1" } },
]
on_exit = [{ command = ["true"] }, { command = ["echo", "bye"] }]

[[singleton]]
name = "flow"
command = ["python3", "flow_server.py"]
ready = { unix_socket = "run/flow.sock" }
restart = "on-failure"
env = { FLOW_SOCKET = "run/flow.sock" }
stop_timeout = "3s"

[[singleton]]
name = "tickets"
command = ["presup-ticket-server"]
ready = { tcp = "localhost:5001" }
stop_signal = "quit"

[[singleton]]
name = "cron"
command = ["cron", "-f"]

[tickets.identify]
interval = "5s"
buckets = 16
daily_limit = 1000
daily_period = "12h"
http = "127.0.0.1:5000"
path = "state/identify"

[tickets.other]
interval = "250ms"
"#;

#[test]
fn full_config_resolves_values_and_defaults() {
    let c = parse(FULL);
    assert_eq!(c.path, PathBuf::from(FILE));
    assert_eq!(c.directory, PathBuf::from("/etc/presup/app"));
    assert_eq!(c.pidfile, Some(PathBuf::from("/etc/presup/run/presup.pid")));
    assert_eq!(c.graceful_timeout, secs(20));
    assert_eq!((c.user.as_deref(), c.group.as_deref()), (Some("root"), Some("root")));
    assert_eq!(c.umask, Some(0o027));

    let listen =
        |name: &str, address: Address, backlog| Listen { name: name.to_owned(), address, backlog };
    assert_eq!(
        c.listen,
        vec![
            listen("http", Address::Tcp(addr("127.0.0.1:8000")), 1024),
            listen("admin.v6", Address::Tcp(addr("[::1]:9000")), 64),
            listen("sock", Address::Unix("/etc/presup/run/app.sock".into()), 1024),
        ]
    );

    let backoff = Backoff { initial: ms(50), max: secs(60), reset: secs(10) };
    let workers = Workers {
        command: argv(&["python3", "app.py"]),
        count: 4,
        env: env(&[("APP_ENV", "production")]),
        ready: Ready::Notify,
        min_uptime: ms(500),
        boot_timeout: secs(10),
        watchdog: Some(secs(5)),
        stop_signal: Signal(SIGINT),
        restart_backoff: backoff,
        boot_attempts: 3,
        reload_batch: 2,
        forward_signals: vec![Signal(nix::sys::signal::Signal::SIGUSR1)],
        preload: false,
    };
    assert_eq!(c.workers, workers);

    let register = argv(&["python3", "app.py", "register"]);
    let on_starting =
        Hook { command: register, timeout: secs(90), retries: 3, env: env(&[("X", "1")]) };
    let hook =
        |args: &[&str]| Hook { command: argv(args), timeout: secs(60), retries: 0, env: env(&[]) };
    let hooks = Hooks {
        on_starting: vec![on_starting],
        on_exit: vec![hook(&["true"]), hook(&["echo", "bye"])],
        ..Hooks::default()
    };
    assert_eq!(c.hooks, hooks);

    let default_backoff = Backoff { initial: ms(100), max: secs(30), reset: secs(10) };
    let singleton = |name: &str, args: &[&str], ready| Singleton {
        name: name.to_owned(),
        command: argv(args),
        ready,
        restart: Restart::Always,
        env: env(&[]),
        min_uptime: secs(1),
        boot_timeout: secs(30),
        stop_signal: Signal(SIGTERM),
        stop_timeout: secs(20),
        restart_backoff: default_backoff,
        forward_signals: vec![],
    };
    let flow = Singleton {
        restart: Restart::OnFailure,
        env: env(&[("FLOW_SOCKET", "run/flow.sock")]),
        stop_timeout: secs(3),
        ..singleton(
            "flow",
            &["python3", "flow_server.py"],
            Ready::UnixSocket("/etc/presup/run/flow.sock".into()),
        )
    };
    let ticket_server = Singleton {
        stop_signal: Signal(SIGQUIT),
        ..singleton("tickets", &["presup-ticket-server"], Ready::Tcp(addr("127.0.0.1:5001")))
    };
    let cron = singleton("cron", &["cron", "-f"], Ready::Spawn);
    assert_eq!(c.singleton, vec![flow, ticket_server, cron]);

    let identify = Ticket {
        interval: secs(5),
        buckets: 16,
        daily_limit: Some(1000),
        daily_period: secs(12 * 3600),
        http: Some(addr("127.0.0.1:5000")),
        path: Some("/etc/presup/state/identify".into()),
        margin: ms(50),
    };
    let other = Ticket {
        interval: ms(250),
        buckets: 1,
        daily_limit: None,
        daily_period: secs(24 * 3600),
        http: None,
        path: None,
        margin: Duration::from_micros(12_500),
    };
    assert_eq!(
        c.tickets,
        BTreeMap::from([("identify".to_owned(), identify), ("other".to_owned(), other)])
    );
}

#[test]
fn minimal_config_takes_the_defaults() {
    let c = parse("[workers]\ncommand = [\"app\"]\n");
    assert_eq!(c.directory, PathBuf::from(DIR));
    assert_eq!((c.pidfile, c.graceful_timeout, c.umask), (None, secs(30), None));
    assert!(c.listen.is_empty() && c.singleton.is_empty() && c.tickets.is_empty());
    assert_eq!(c.hooks, Hooks::default());
    let workers = Workers {
        command: argv(&["app"]),
        count: 1,
        env: env(&[]),
        ready: Ready::Spawn,
        min_uptime: secs(1),
        boot_timeout: secs(30),
        watchdog: None,
        stop_signal: Signal(SIGTERM),
        restart_backoff: Backoff { initial: ms(100), max: secs(30), reset: secs(10) },
        boot_attempts: 5,
        reload_batch: 1,
        forward_signals: vec![],
        preload: false,
    };
    assert_eq!(c.workers, workers);
}

#[test]
fn count_auto_is_the_cpu_count() {
    let c = parse("[workers]\ncommand = [\"app\"]\ncount = \"auto\"\n");
    assert_eq!(c.workers.count, 8);
}

#[test]
fn web_concurrency_overrides_count() {
    let text = "[workers]\ncommand = [\"app\"]\ncount = \"auto\"\n";
    assert_eq!(parse_with(text, Some("3")).unwrap().workers.count, 3);
    let text = "[workers]\ncommand = [\"app\"]\ncount = 0\n";
    assert_eq!(parse_with(text, Some("2")).unwrap().workers.count, 2);
}

#[test]
fn bad_web_concurrency_is_an_error_without_position() {
    for bad in ["zero", "0", "-1", "", "1025", "100000"] {
        let errors = parse_with("[workers]\ncommand = [\"app\"]\n", Some(bad)).unwrap_err();
        let message = format!("expected an integer from 1 to 1024, found {bad:?}");
        assert_eq!(errors, vec![error("WEB_CONCURRENCY", 0, 0, &message)]);
    }
}

#[test]
fn every_error_is_reported_at_once_in_file_order() {
    let text = r#"graceful_timeout = 30
pidfile = "run/x.pid"

[[listen]]
name = "http"
address = "example.com:80"
backlog = 0

[workers]
cout = 4
command = ["app"]
min_uptime = "soon"
restart_backoff = { initial = "1m" }

[hooks]
on_starting = [{ command = [], timeout = "-1s" }]

[[singleton]]
command = ["sched"]
ready = "later"

[tickets.identify]
buckets = "many"
"#;
    let expected = [
        r#"graceful_timeout: line 1, column 20: expected a duration like "5s", found an integer"#,
        r#"listen[0].address: line 6, column 11: invalid address "example.com:80": the host must be an IP address or "localhost", not "example.com""#,
        r#"listen[0].backlog: line 7, column 11: expected an integer from 1 to 65535, found 0"#,
        r#"workers.cout: line 10, column 1: unknown key "cout" (expected one of: command, count, env, ready, min_uptime, boot_timeout, watchdog, stop_signal, restart_backoff, boot_attempts, reload_batch, forward_signals, preload)"#,
        r#"workers.min_uptime: line 12, column 14: invalid duration "soon": expected number at 0"#,
        r#"workers.restart_backoff: line 13, column 19: initial (1m) is longer than max (30s)"#,
        r#"hooks.on_starting[0].command: line 16, column 28: empty command"#,
        r#"hooks.on_starting[0].timeout: line 16, column 42: invalid duration "-1s": expected number at 0"#,
        r#"singleton[0].name: line 18, column 1: missing required key "name""#,
        r#"singleton[0].ready: line 20, column 9: expected one of "spawn", "notify", found "later""#,
        r#"tickets.identify.interval: line 22, column 1: missing required key "interval""#,
        r#"tickets.identify.buckets: line 23, column 11: expected an integer, found "many""#,
    ];
    assert_eq!(printed(text), expected);
}

#[test]
fn unknown_keys_name_the_valid_ones() {
    let text = "graceful = \"1s\"\n[workers]\ncommand = [\"a\"]\n";
    let expected = r#"graceful: line 1, column 1: unknown key "graceful" (expected one of: pidfile, graceful_timeout, directory, user, group, umask, listen, workers, hooks, singleton, tickets, control, metrics)"#;
    assert_eq!(printed(text), [expected]);

    let text =
        "[workers]\ncommand = [\"a\"]\nrestart_backoff = { initial = \"1s\", maximum = \"2s\" }\n";
    let expected = r#"workers.restart_backoff.maximum: line 3, column 37: unknown key "maximum" (expected one of: initial, max, reset)"#;
    assert_eq!(printed(text), [expected]);

    let e = only_error("[workers]\ncommand = [\"a\"]\n[hooks]\non_start = []\n");
    assert_eq!((e.key.as_str(), e.line, e.column), ("hooks.on_start", 4, 1));
    let e = only_error("[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\nready = { tcp = \"127.0.0.1:1\", udp = 1 }\n");
    assert_eq!((e.key.as_str(), e.line, e.column), ("singleton[0].ready.udp", 4, 32));
}

#[test]
fn wrong_types_say_what_was_expected_and_found() {
    let text = r#"user = 1000
listen = { name = "http" }
[workers]
command = "python3 app.py"
env = { A = 1, B = "ok" }
boot_attempts = 0
watchdog = true
count = 2.5
[tickets]
identify = "5s"
"#;
    let expected = [
        r#"user: line 1, column 8: expected a string, found an integer"#,
        r#"listen: line 2, column 10: expected an array, found a table"#,
        r#"workers.command: line 4, column 11: expected an array, found "python3 app.py""#,
        r#"workers.env.A: line 5, column 13: expected a string, found an integer"#,
        r#"workers.boot_attempts: line 6, column 17: expected an integer >= 1, found 0"#,
        r#"workers.watchdog: line 7, column 12: expected a duration like "5s", found a boolean"#,
        r#"workers.count: line 8, column 9: expected a positive integer or "auto", found a float"#,
        r#"tickets.identify: line 10, column 12: expected a table, found "5s""#,
    ];
    assert_eq!(printed(text), expected);
}

#[test]
fn bad_values_are_reported_with_the_value() {
    let text = r#"umask = "999"
[workers]
command = ["", "x"]
stop_signal = "TERMINATE"
ready = { unix_socket = "run/w.sock" }
[[listen]]
name = "a:b"
address = "127.0.0.1"
[[listen]]
name = ""
address = "::1:80"
[[listen]]
name = "c"
address = "localhost:http"
[tickets.bad-name]
interval = "0s"
daily_limit = 0
http = "unix:x.sock"
"#;
    let expected = [
        r#"umask: line 1, column 9: invalid umask "999": expected octal digits like "022" or "0027""#,
        r#"workers.command: line 3, column 11: empty command"#,
        r#"workers.stop_signal: line 4, column 15: unknown signal "TERMINATE""#,
        r#"workers.ready: line 5, column 9: workers take "spawn" or "notify" ({ unix_socket } and { tcp } are for singletons)"#,
        r#"listen[0].name: line 7, column 8: invalid name "a:b": use only letters, digits, '_', '.' and '-'"#,
        r#"listen[0].address: line 8, column 11: invalid address "127.0.0.1": expected "host:port" or "[ipv6]:port""#,
        r#"listen[1].name: line 10, column 8: empty name"#,
        r#"listen[1].address: line 11, column 11: invalid address "::1:80": an IPv6 address goes in brackets, e.g. "[::1]:8000""#,
        r#"listen[2].address: line 14, column 11: invalid address "localhost:http": invalid port "http""#,
        r#"tickets.bad-name: line 15, column 10: invalid ticket name "bad-name": use only letters, digits and '_' (it becomes PRESUP_TICKET_<NAME>)"#,
        r#"tickets.bad-name.interval: line 16, column 12: must be greater than zero"#,
        r#"tickets.bad-name.daily_limit: line 17, column 15: expected an integer from 1 to 1048576, found 0"#,
        r#"tickets.bad-name.http: line 18, column 8: expected a TCP "host:port", found "unix:x.sock""#,
    ];
    assert_eq!(printed(text), expected);
}

#[test]
fn signals_take_any_case_with_or_without_sig() {
    for (name, signal) in [("TERM", SIGTERM), ("SIGINT", SIGINT), ("quit", SIGQUIT)] {
        let text = format!("[workers]\ncommand = [\"a\"]\nstop_signal = \"{name}\"\n");
        assert_eq!(parse(&text).workers.stop_signal, Signal(signal));
    }
}

#[test]
fn columns_count_characters_not_bytes() {
    let e = only_error("[workers]\ncommand = [\"é\"]\nenv = { \"ü\" = \"ö\", N = 1 }\n");
    assert_eq!((e.key.as_str(), e.line, e.column), ("workers.env.N", 3, 24));
}

#[test]
fn unix_paths_are_absolute_and_length_checked() {
    let listener = |path: &str| {
        format!(
            "[workers]\ncommand = [\"a\"]\n[[listen]]\nname = \"u\"\naddress = \"unix:{path}\"\n"
        )
    };
    let long = "s".repeat(100);
    let message = format!("unix socket path {DIR}/{long} is 112 bytes long, over the limit of 107");
    assert_eq!(only_error(&listener(&long)), error("listen[0].address", 5, 11, &message));

    let longest = "s".repeat(107 - DIR.len() - 1);
    let path = PathBuf::from(format!("{DIR}/{longest}"));
    assert_eq!(parse(&listener(&longest)).listen[0].address, Address::Unix(path));
    let absolute = parse(&listener("/run/a.sock")).listen[0].address.clone();
    assert_eq!(absolute, Address::Unix("/run/a.sock".into()));

    let singleton = format!(
        "[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\nready = {{ unix_socket = \"{long}\" }}\n"
    );
    let e = only_error(&singleton);
    assert_eq!((e.key.as_str(), e.line, e.column), ("singleton[0].ready.unix_socket", 4, 25));
}

#[test]
fn duplicate_names_and_addresses() {
    let text = r#"
[workers]
command = ["a"]
[[listen]]
name = "http"
address = "127.0.0.1:8000"
[[listen]]
name = "http"
address = "localhost:8000"
[[listen]]
name = "sock"
address = "unix:run/a.sock"
[[listen]]
name = "sock2"
address = "unix:/etc/presup/run/./a.sock"
[[singleton]]
name = "s"
command = ["s"]
[[singleton]]
name = "s"
command = ["s"]
[tickets.one]
interval = "1s"
http = "127.0.0.1:8000"
[tickets.ONE]
interval = "1s"
"#;
    let expected = [
        r#"listen[1].name: line 8, column 8: listener name "http" is already used by listen[0]"#,
        r#"listen[1].address: line 9, column 11: address 127.0.0.1:8000 is already used by listen[0]"#,
        r#"listen[3].address: line 15, column 11: address unix:/etc/presup/run/a.sock is already used by listen[2]"#,
        r#"singleton[1].name: line 20, column 8: singleton name "s" is already used by singleton[0]"#,
        r#"tickets.one: line 22, column 1: ticket tickets.ONE and tickets.one both become PRESUP_TICKET_ONE"#,
        r#"tickets.one.http: line 24, column 8: address 127.0.0.1:8000 is already used by listen[0]"#,
    ];
    assert_eq!(printed(text), expected);
}

#[test]
fn duplicates_are_found_past_a_broken_element() {
    let text = r#"[workers]
command = ["a"]
[[listen]]
name = 1
[[listen]]
name = "h"
address = "127.0.0.1:1"
[[listen]]
name = "h"
address = "127.0.0.1:2"
"#;
    let expected = [
        r#"listen[0].address: line 3, column 1: missing required key "address""#,
        r#"listen[0].name: line 4, column 8: expected a string, found an integer"#,
        r#"listen[2].name: line 9, column 8: listener name "h" is already used by listen[1]"#,
    ];
    assert_eq!(printed(text), expected);
}

#[test]
fn count_zero_needs_a_singleton() {
    let e = only_error("[workers]\ncommand = [\"a\"]\ncount = 0\n");
    let message = "count 0 with no singleton nor ticket with `http` leaves nothing to run";
    assert_eq!(e, error("workers.count", 3, 9, message));
    let text =
        "[workers]\ncommand = [\"a\"]\ncount = 0\n[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\n";
    assert_eq!(parse(text).workers.count, 0);
}

#[test]
fn workers_may_be_left_out_only_with_a_singleton() {
    let c = parse("[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\n");
    assert_eq!((c.workers.command.len(), c.workers.count), (0, 0));
    assert_eq!(c.workers.boot_attempts, 5);

    let e = only_error("pidfile = \"p\"\n");
    let message =
        "missing table [workers] (it may be left out only with a [[singleton]] or a ticket with `http`)";
    assert_eq!(e, error("workers", 1, 1, message));
}

#[test]
fn syntax_error_has_a_position() {
    let e = only_error("[workers]\ncommand = [\"a\"\ncount = 2\n");
    assert_eq!((e.key.as_str(), e.line, e.column), ("", 3, 1));
    assert!(!e.message.is_empty());
    let e = only_error("a = 1\na = 2\n");
    assert_eq!(e, error("", 2, 1, "duplicate key"));
    assert_eq!(e.to_string(), "line 2, column 1: duplicate key");
}

#[test]
fn unknown_user_and_group() {
    let text = r#"user = "no-such-user-presup"
group = "no-such-group-presup"
[workers]
command = ["a"]
"#;
    let expected = [
        r#"user: line 1, column 8: no such user "no-such-user-presup""#,
        r#"group: line 2, column 9: no such group "no-such-group-presup""#,
    ];
    assert_eq!(printed(text), expected);
}

#[test]
fn resolved_config_prints_as_toml_and_reads_back() {
    let config = parse(FULL);
    let text = toml::to_string_pretty(&config).expect("serializes");
    assert!(text.contains("umask = \"0027\"\n"), "{text}");
    // `path` is not a key of the file; the rest reads back to the same config.
    let expected_path = format!("path = \"{FILE}\"\n");
    let rest = text.strip_prefix(&expected_path).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(parse(rest), config, "{rest}");

    // Without [workers] (so with `command = []`) it prints too, though not as a valid file.
    let minimal = parse("[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\n");
    let text = toml::to_string_pretty(&minimal).expect("serializes");
    assert!(text.contains("[workers]\ncommand = []\ncount = 0\n"), "{text}");
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("supervisor.toml");
    let text =
        "[workers]\ncommand = [\"a\"]\n[[listen]]\nname = \"s\"\naddress = \"unix:s.sock\"\n";
    std::fs::write(&path, text).unwrap();
    let config = load(&path, None, 2, Launch::Exec).unwrap();
    assert_eq!(config.path, path);
    assert_eq!(config.listen[0].address, Address::Unix(dir.path().join("s.sock")));

    std::fs::write(&path, "[workers]\ncommand = []\n").unwrap();
    let err = load(&path, None, 2, Launch::Exec).unwrap_err();
    let p = path.display();
    let shown = format!("{p}: 1 error\n  {p}: workers.command: line 2, column 11: empty command");
    assert_eq!(err.to_string(), shown);
}

#[test]
fn load_refuses_what_is_not_a_regular_file_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A blocking open would wait here for a writer forever.
    let message = |p: &Path| load(p, None, 2, Launch::Exec).unwrap_err().errors[0].message.clone();
    assert_eq!(message(&fifo), "cannot read: a FIFO; the config must be a regular file");
    assert_eq!(message(dir.path()), "cannot read: a directory; the config must be a regular file");
    assert_eq!(
        message(Path::new("/dev/null")),
        "cannot read: a device; the config must be a regular file"
    );
    let big = dir.path().join("big.toml");
    std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
    assert_eq!(message(&big), "cannot read: larger than the limit of 1048576 bytes");
    std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize]).unwrap();
    assert!(message(&big).contains("missing table [workers]"), "{}", message(&big));
    std::fs::write(&big, b"# \xff\n").unwrap();
    assert!(message(&big).starts_with("cannot read: not UTF-8"), "{}", message(&big));
}

#[test]
fn count_is_bounded_with_line_and_column() {
    let text = "[workers]\ncommand = [\"app\"]\ncount = 1025\n";
    let message = "expected an integer from 0 to 1024, found 1025";
    assert_eq!(only_error(text), error("workers.count", 3, 9, message));
    let text = "[workers]\ncommand = [\"app\"]\ncount = 1024\n";
    assert_eq!(parse(text).workers.count, MAX_WORKERS);
    let text = "[workers]\ncommand = [\"app\"]\ncount = \"auto\"\n";
    let dir = Path::new(DIR);
    let huge = parse_str(text, Path::new(FILE), dir, None, 5000, Launch::Exec).unwrap();
    assert_eq!(huge.workers.count, MAX_WORKERS, "auto on a machine with more CPUs than the bound");
}

#[test]
fn a_nul_byte_in_an_argument_or_the_environment_is_an_error_at_its_place() {
    let text = r#"[workers]
command = ["app", "a\u0000b"]
env = { "K\u0000" = "v", GOOD = "x\u0000" }
[[hooks.on_starting]]
command = ["hook\u0000"]
[[singleton]]
name = "s"
command = ["s", "\u0000"]
"#;
    let got: Vec<(String, usize, usize)> =
        errors(text).into_iter().map(|e| (e.key, e.line, e.column)).collect();
    let want = [
        ("workers.command[1]", 2, 19),
        ("workers.env.K\0", 3, 9),
        ("workers.env.GOOD", 3, 33),
        ("hooks.on_starting[0].command[0]", 5, 12),
        ("singleton[0].command[1]", 8, 17),
    ];
    let want: Vec<(String, usize, usize)> =
        want.iter().map(|(k, l, c)| (k.to_string(), *l, *c)).collect();
    assert_eq!(got, want);
    let e = &errors(text)[0];
    assert_eq!(
        e.message,
        "\"a\\0b\" holds a NUL byte, which no argument, environment variable or path may hold"
    );
}

#[test]
fn a_ticket_with_http_is_enough_to_run_but_a_ticket_alone_is_not() {
    let c = parse("[tickets.gateway]\ninterval = \"5s\"\nhttp = \"127.0.0.1:0\"\n");
    assert_eq!((c.workers.count, c.singleton.len(), c.tickets.len()), (0, 0, 1));
    let c = parse("[workers]\ncount = 0\n[tickets.g]\ninterval = \"5s\"\nhttp = \"127.0.0.1:0\"\n");
    assert_eq!(c.workers.count, 0);
    let message =
        "missing table [workers] (it may be left out only with a [[singleton]] or a ticket with `http`)";
    assert_eq!(only_error("[tickets.g]\ninterval = \"5s\"\n"), error("workers", 1, 1, message));
}

#[test]
fn only_usr1_may_be_forwarded() {
    let text = "[workers]\ncommand = [\"app\"]\nforward_signals = [\"USR1\", \"TERM\", \"HUPP\"]\n";
    assert_eq!(
        printed(text),
        [
            r#"workers.forward_signals[1]: line 3, column 28: SIGTERM cannot be forwarded: only USR1 is (the master acts on the other signals itself)"#,
            r#"workers.forward_signals[2]: line 3, column 36: unknown signal "HUPP""#,
        ]
    );
    let c = parse("[workers]\ncommand = [\"app\"]\n[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\nforward_signals = [\"usr1\"]\n");
    assert_eq!(c.singleton[0].forward_signals, [Signal(nix::sys::signal::Signal::SIGUSR1)]);
    assert!(c.workers.forward_signals.is_empty(), "forwarding is opt-in");
}

#[test]
fn a_ticket_margin_defaults_to_a_twentieth_of_its_interval_at_most_50ms() {
    let margin = |keys: &str| {
        let c = parse(&format!("[workers]\ncommand = [\"a\"]\n[tickets.t]\n{keys}\n"));
        c.tickets["t"].margin
    };
    assert_eq!(margin("interval = \"5s\""), ms(50));
    assert_eq!(margin("interval = \"1s\""), ms(50));
    assert_eq!(margin("interval = \"200ms\""), ms(10));
    assert_eq!(margin("interval = \"5s\"\nmargin = \"0s\""), Duration::ZERO);
    assert_eq!(margin("interval = \"5s\"\nmargin = \"120ms\""), ms(120));
    let e = printed("[workers]\ncommand = [\"a\"]\n[tickets.t]\ninterval = \"1s\"\nmargin = 5\n");
    assert_eq!(
        e,
        [r#"tickets.t.margin: line 5, column 10: expected a duration like "5s", found an integer"#]
    );
}

#[test]
fn exec_d_workers_need_a_command_with_its_line_and_column_but_preloaded_ones_do_not() {
    let text = "graceful_timeout = \"5s\"\n[workers]\ncount = 2\n";
    let e = only_error(text);
    assert_eq!(e, error("workers.command", 2, 1, "missing required key \"command\""));
    assert_eq!(
        e.to_string(),
        "workers.command: line 2, column 1: missing required key \"command\""
    );
    let preload = parse_str(text, Path::new(FILE), Path::new(DIR), None, 8, Launch::Preload);
    let c = preload.unwrap();
    assert_eq!((c.workers.command.len(), c.workers.count), (0, 2));
    // No workers to exec: no command needed either.
    let text = "[workers]\ncount = 0\n[[singleton]]\nname = \"s\"\ncommand = [\"s\"]\n";
    assert_eq!(parse(text).workers.count, 0);
}

#[test]
fn ticket_sizes_are_bounded_by_the_config_alone() {
    let text = |buckets: u32, limit: u64| {
        format!("[tickets.t]\ninterval = \"1s\"\nhttp = \"127.0.0.1:0\"\nbuckets = {buckets}\ndaily_limit = {limit}\n")
    };
    let c = parse(&text(MAX_BUCKETS, MAX_DAILY_LIMIT));
    assert_eq!(c.tickets["t"].buckets, MAX_BUCKETS);
    let all = errors(&text(MAX_BUCKETS + 1, MAX_DAILY_LIMIT + 1));
    let shown: Vec<String> = all.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            format!("tickets.t.buckets: line 4, column 11: expected an integer from 1 to {MAX_BUCKETS}, found {}", MAX_BUCKETS + 1),
            format!("tickets.t.daily_limit: line 5, column 15: expected an integer from 1 to {MAX_DAILY_LIMIT}, found {}", MAX_DAILY_LIMIT + 1),
        ]
    );
}
