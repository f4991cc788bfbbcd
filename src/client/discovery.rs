//! Finding the control socket of the master that runs a config (the protocol's "Finding the
//! master"): `--control PATH`; else the config's `control`; else the `control.sock` of the
//! one live master's runtime directory (`presup-<pid>-<hex>`) whose `ping` names the config.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{self, Launch};
use crate::notify::parse_dir_name;
use crate::procstat::Stat;

use super::request::{self, answer_result};

/// The socket's file name in a runtime directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Where to send requests, and what was learnt on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub socket: PathBuf,
    /// The master's pid, when a `ping` told it.
    pub pid: Option<i32>,
}

/// The control socket for `--control` (`control`) or the config `config_path`; `Err` is the
/// message for a person (exit 1).
pub fn find(config_path: &Path, control: Option<&Path>) -> Result<Found, String> {
    if let Some(path) = control {
        return Ok(Found { socket: path.to_path_buf(), pid: None });
    }
    let shown = config_path.display();
    let loaded = config::load_for_this_process(config_path, Launch::Exec)
        .or_else(|_| config::load_for_this_process(config_path, Launch::Preload));
    // A config that does not load now (edited since, or a rejected reload's) may still be the
    // running master's: look for it all the same, and say why if none is found.
    let (pidfile, broken) = match &loaded {
        Ok(c) => {
            if let Some(path) = &c.control {
                return Ok(Found { socket: path.clone(), pid: None });
            }
            (c.pidfile.clone(), None)
        }
        Err(errors) => (None, Some(errors.to_string())),
    };
    let canonical = std::fs::canonicalize(config_path)
        .map_err(|e| format!("config {shown}: {e}; pass --control PATH"))?;
    let only_pid = pidfile.as_deref().and_then(live_pid_in);
    let bases = bases();
    discover_in(&bases, &canonical, only_pid).map_err(|e| {
        let mut text = e.message(&canonical, &bases);
        if let Some(broken) = broken {
            text.push_str(&format!("\n(the config does not load now, so its `control` and `pidfile` were not used: {broken})"));
        }
        text
    })
}

/// Why discovery found no one master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotFound {
    /// No candidate answered for this config; `refused` are the sockets whose master would not
    /// tell (`permission denied`, say), with its words.
    None { refused: Vec<(PathBuf, String)> },
    /// Several masters say they run it.
    Several(Vec<Found>),
}

impl NotFound {
    fn message(&self, config: &Path, bases: &[PathBuf]) -> String {
        let config = config.display();
        match self {
            NotFound::None { refused } => {
                let looked: Vec<String> = bases.iter().map(|b| b.display().to_string()).collect();
                let mut text = format!(
                    "no running presup master found for {config} (looked in: {}); pass --control PATH or set `control` in the config",
                    looked.join(", ")
                );
                for (socket, why) in refused {
                    text.push_str(&format!("\n  {}: {why}", socket.display()));
                }
                text
            }
            NotFound::Several(found) => {
                let list: Vec<String> = found
                    .iter()
                    .map(|f| match f.pid {
                        Some(pid) => format!("pid {pid} ({})", f.socket.display()),
                        None => f.socket.display().to_string(),
                    })
                    .collect();
                format!(
                    "several presup masters run {config}: {}; pass --control PATH",
                    list.join(", ")
                )
            }
        }
    }
}

/// Looks for the master of `config` (canonical) in the runtime directories under `bases`,
/// only those of `only_pid` if given.
pub fn discover_in(
    bases: &[PathBuf],
    config: &Path,
    only_pid: Option<i32>,
) -> Result<Found, NotFound> {
    let mut matching = Vec::new();
    let mut refused = Vec::new();
    for socket in candidates(bases, only_pid) {
        let answer = match request::send(&socket, "ping", Map::new()) {
            Ok(a) => a,
            // A socket of a master that is going away, or a stale file: not a candidate.
            Err(e) if e.nobody_there() => continue,
            Err(e) => {
                refused.push((socket, e.to_string()));
                continue;
            }
        };
        match answer_result(answer) {
            Ok(fields) => {
                let named = fields.get("config").and_then(Value::as_str).map(Path::new);
                if named == Some(config) {
                    let pid = fields.get("pid").and_then(Value::as_i64).map(|p| p as i32);
                    matching.push(Found { socket, pid });
                }
            }
            Err(why) => refused.push((socket, why)),
        }
    }
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => Err(NotFound::None { refused }),
        _ => Err(NotFound::Several(matching)),
    }
}

/// The `control.sock` of every runtime directory under `bases` named for a live pid (only
/// `only_pid`'s if given), each once.
fn candidates(bases: &[PathBuf], only_pid: Option<i32>) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut seen_dirs = std::collections::BTreeSet::new();
    for base in bases {
        let Ok(entries) = std::fs::read_dir(base) else { continue };
        let mut dirs: Vec<(i32, PathBuf)> = entries
            .flatten()
            .filter_map(|e| Some((parse_dir_name(e.file_name().to_str()?)?, e.path())))
            .filter(|(pid, _)| only_pid.map_or(true, |p| p == *pid) && alive(*pid))
            .collect();
        dirs.sort();
        for (_, dir) in dirs {
            // /run/user/0 and $XDG_RUNTIME_DIR are often the same directory.
            let key = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
            let socket = dir.join(SOCKET_NAME);
            let is_socket = std::fs::symlink_metadata(&socket)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if is_socket && seen_dirs.insert(key) {
                out.push(socket);
            }
        }
    }
    out
}

/// The directories a master may have made its runtime directory in, each once: the
/// protocol's list, in its order.
pub fn bases() -> Vec<PathBuf> {
    let mut bases: Vec<PathBuf> = Vec::new();
    // systemd joins several RuntimeDirectory= with ':'.
    if let Some(dirs) = std::env::var_os("RUNTIME_DIRECTORY") {
        bases.extend(std::env::split_paths(&dirs));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        bases.push(dir.into());
    }
    bases.push(std::env::temp_dir());
    bases.push(PathBuf::from(format!("/run/user/{}", nix::unistd::Uid::current())));
    if let Ok(entries) = std::fs::read_dir("/run") {
        let mut under: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        under.sort();
        bases.extend(under);
    }
    let mut seen = std::collections::BTreeSet::new();
    bases.retain(|b| !b.as_os_str().is_empty() && seen.insert(b.clone()));
    bases
}

/// The pid a pidfile holds, if that process lives.
fn live_pid_in(pidfile: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (pid > 0 && alive(pid)).then_some(pid)
}

/// Whether `pid` is a live process (a zombie is not).
pub fn alive(pid: i32) -> bool {
    Stat::read(pid).is_some_and(|s| !s.gone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A fake master: answers every `ping` on `dir/control.sock` with `config` and `pid`, on a
    /// thread, until the test process ends.
    fn fake_master(dir: &Path, pid: i32, config: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let listener = UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
        let answer = serde_json::json!({"v": 1, "ok": true, "pid": pid, "config": config,
                                        "version": "0.1.0"});
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let mut line = String::new();
                let _ = BufReader::new(&conn).read_line(&mut line);
                let asked: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(asked["command"], "ping");
                let _ = writeln!(&conn, "{answer}");
            }
        });
    }

    #[test]
    fn finds_the_one_live_master_of_the_config() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        let me = std::process::id() as i32;
        let ours = "/srv/app/supervisor.toml";
        // This process is alive: its "runtime directories" are candidates.
        fake_master(&a.join(format!("presup-{me}-0000abcd")), me, "/srv/other/supervisor.toml");
        fake_master(&b.join(format!("presup-{me}-0000beef")), me, ours);
        // Answers for our config, but its pid is dead: never asked.
        fake_master(&a.join("presup-999999999-00000001"), 999_999_999, ours);
        // Not presup's names.
        fake_master(&a.join(format!("presup-{me}-xyz")), me, ours);
        fake_master(&a.join(format!("other-{me}-0000abcd")), me, ours);
        // A stale socket file of a live pid (nobody accepts): skipped.
        let stale = b.join(format!("presup-{me}-0000dead"));
        std::fs::create_dir(&stale).unwrap();
        drop(UnixListener::bind(stale.join(SOCKET_NAME)).unwrap());
        // No socket at all.
        std::fs::create_dir(a.join(format!("presup-{me}-00000002"))).unwrap();

        let bases = vec![a.clone(), b.clone(), tmp.path().join("missing")];
        let found = discover_in(&bases, Path::new(ours), None).unwrap();
        let socket = b.join(format!("presup-{me}-0000beef")).join(SOCKET_NAME);
        assert_eq!(found, Found { socket: socket.clone(), pid: Some(me) });
        // Restricted to the pidfile's pid: the same; to another pid: none.
        assert_eq!(discover_in(&bases, Path::new(ours), Some(me)).unwrap().socket, socket);
        let none = discover_in(&bases, Path::new(ours), Some(1)).unwrap_err();
        assert_eq!(none, NotFound::None { refused: vec![] });
        let message = none.message(Path::new(ours), &bases);
        assert!(
            message.starts_with(
                "no running presup master found for /srv/app/supervisor.toml (looked in: "
            ),
            "{message}"
        );
        assert!(message.contains(&a.display().to_string()), "{message}");
        assert!(message.ends_with("pass --control PATH or set `control` in the config"));

        // A second master of the same config: an error naming both.
        fake_master(&a.join(format!("presup-{me}-0000cafe")), me, ours);
        let several = discover_in(&bases, Path::new(ours), None).unwrap_err();
        let NotFound::Several(found) = &several else { panic!("{several:?}") };
        assert_eq!(found.len(), 2);
        let message = several.message(Path::new(ours), &bases);
        assert!(
            message.contains(&format!("pid {me}")) && message.contains("0000cafe"),
            "{message}"
        );
    }

    #[test]
    fn a_refusal_is_shown() {
        let tmp = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let dir = tmp.path().join(format!("presup-{me}-0000abcd"));
        std::fs::create_dir(&dir).unwrap();
        let listener = UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = writeln!(
                    &conn,
                    r#"{{"v":1,"ok":false,"error":"permission denied: uid 65534 is neither root nor the master's user"}}"#
                );
            }
        });
        let bases = vec![tmp.path().to_path_buf()];
        let err = discover_in(&bases, Path::new("/x/supervisor.toml"), None).unwrap_err();
        let message = err.message(Path::new("/x/supervisor.toml"), &bases);
        assert!(message.contains("control.sock: permission denied: uid 65534"), "{message}");
    }

    #[test]
    fn the_config_says_where() {
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("supervisor.toml");
        std::fs::write(&config, "control = \"run/ctl.sock\"\n[workers]\ncommand = [\"x\"]\n")
            .unwrap();
        let found = find(&config, None).unwrap();
        assert_eq!(found.socket, tmp.path().join("run/ctl.sock"));
        // --control wins.
        let found = find(&config, Some(Path::new("/elsewhere.sock"))).unwrap();
        assert_eq!(found.socket, Path::new("/elsewhere.sock"));
        let err = find(&tmp.path().join("missing.toml"), None).unwrap_err();
        assert!(err.contains("missing.toml") && err.contains("--control"), "{err}");
    }

    #[test]
    fn bases_follow_the_protocol_order() {
        let bases = bases();
        assert!(bases.contains(&std::env::temp_dir()));
        let uid = nix::unistd::Uid::current();
        assert!(bases.contains(&PathBuf::from(format!("/run/user/{uid}"))));
        let mut unique = bases.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), bases.len());
    }
}
