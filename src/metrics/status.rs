//! The master's STATUS (control protocol v1, `status` command): what the metrics server reads
//! of it, and the one request that fetches it.
//!
//! Every field defaults when absent and unknown fields are ignored, so that a master a little
//! newer or older than this server still gives the metrics both know; only a field of the
//! wrong type fails the scrape.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use serde::Deserialize;

/// The most a status answer may be (1024 workers take about 200 kB).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub master: Master,
    pub workers: Vec<Worker>,
    pub slots: Vec<Slot>,
    pub singletons: Vec<Singleton>,
    pub stems: Vec<Stem>,
    pub counters: Counters,
    pub tickets: Vec<Ticket>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Master {
    pub pid: i32,
    pub version: String,
    pub started_unix: f64,
    pub uptime_seconds: f64,
    pub generation: u64,
    pub workers_target: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Worker {
    pub slot: u64,
    pub pid: i32,
    pub generation: u64,
    pub state: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Slot {
    pub slot: u64,
    pub restarts: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Singleton {
    pub name: String,
    pub pid: Option<i32>,
    pub state: String,
    pub restarts: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Stem {
    pub pid: i32,
    pub generation: u64,
    pub state: String,
    pub forks: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Counters {
    /// By kind: `crash`, `boot_failure`, `stopped`, `watchdog`.
    pub worker_exits: BTreeMap<String, u64>,
    /// By result: `done`, `undone`, `rejected`.
    pub reloads: BTreeMap<String, u64>,
    pub hook_runs: Vec<HookRuns>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct HookRuns {
    pub point: String,
    pub result: String,
    pub count: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Ticket {
    pub name: String,
    pub buckets: Vec<Bucket>,
    pub grants: u64,
    pub wait_seconds_total: Option<f64>,
    pub daily_left: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Bucket {
    pub bucket: u64,
    pub next_free_in_seconds: f64,
}

/// An answer's envelope.
#[derive(Deserialize)]
struct Answer {
    v: u64,
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    status: Option<Status>,
}

/// Why no STATUS came.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot connect to the control socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    #[error("control socket: no answer within {0:?}")]
    TimedOut(Duration),
    #[error("control socket: the answer is over {MAX_ANSWER} bytes")]
    TooLong,
    #[error("control socket: the connection closed before a whole answer")]
    Truncated,
    #[error("control socket: the answer is not a v1 status: {0}")]
    Invalid(String),
    #[error("the master says: {0}")]
    Refused(String),
}

/// Asks the master listening on `path` for its STATUS, all within `timeout`.
pub fn fetch(path: &Path, timeout: Duration) -> Result<Status, FetchError> {
    let deadline = Instant::now() + timeout;
    let mut stream = connect_now(path)
        .map_err(|source| FetchError::Connect { path: path.display().to_string(), source })?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"{\"v\":1,\"command\":\"status\"}\n").map_err(|e| timed_out(e, timeout))?;
    let line = read_line(&mut stream, deadline, timeout)?;
    parse_answer(&line)
}

/// Parses one answer line of the `status` command.
pub fn parse_answer(line: &[u8]) -> Result<Status, FetchError> {
    let answer: Answer =
        serde_json::from_slice(line).map_err(|e| FetchError::Invalid(e.to_string()))?;
    if answer.v != 1 {
        return Err(FetchError::Invalid(format!("protocol version {}", answer.v)));
    }
    match (answer.ok, answer.status) {
        (true, Some(status)) => Ok(status),
        (true, None) => Err(FetchError::Invalid("no status in the answer".into())),
        (false, _) => Err(FetchError::Refused(answer.error.unwrap_or_else(|| "no reason".into()))),
    }
}

/// Connects without waiting: a Unix socket whose backlog is full refuses a non-blocking
/// connect (`EAGAIN`) instead of blocking it past any timeout.
fn connect_now(path: &Path) -> io::Result<UnixStream> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    let addr = UnixAddr::new(path)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr)?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Reads up to the first newline, by `deadline`.
fn read_line(
    stream: &mut UnixStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, FetchError> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::TimedOut(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(FetchError::Truncated),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(timed_out(e, timeout)),
        };
        let start = buf.len();
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf[start..].iter().position(|&b| b == b'\n') {
            buf.truncate(start + i);
            return Ok(buf);
        }
        if buf.len() > MAX_ANSWER {
            return Err(FetchError::TooLong);
        }
    }
}

fn timed_out(e: io::Error, timeout: Duration) -> FetchError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => FetchError::TimedOut(timeout),
        _ => FetchError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_that_are_not_a_status_are_errors() {
        assert!(matches!(
            parse_answer(br#"{"v":1,"ok":false,"error":"busy"}"#),
            Err(FetchError::Refused(e)) if e == "busy"
        ));
        assert!(matches!(
            parse_answer(br#"{"v":2,"ok":true,"status":{}}"#),
            Err(FetchError::Invalid(_))
        ));
        assert!(matches!(parse_answer(br#"{"v":1,"ok":true}"#), Err(FetchError::Invalid(_))));
        assert!(matches!(parse_answer(b"not json"), Err(FetchError::Invalid(_))));
        assert!(matches!(
            parse_answer(br#"{"v":1,"ok":true,"status":{"master":{"pid":"x"}}}"#),
            Err(FetchError::Invalid(_))
        ));
        // Unknown fields and missing ones are fine.
        let s =
            parse_answer(br#"{"v":1,"ok":true,"status":{"master":{"pid":7,"new":1}},"extra":2}"#)
                .unwrap();
        assert_eq!((s.master.pid, s.workers.len()), (7, 0));
    }

    /// A stand-in master on a real socket that answers with `parts`, written one by one.
    fn answering(parts: &'static [&'static [u8]]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, br#"{"v":1,"command":"status"}"#);
            for part in parts {
                stream.write_all(part).unwrap();
                stream.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        (dir, path)
    }

    #[test]
    fn fetches_an_answer_in_pieces_and_refuses_a_cut_one() {
        let (_dir, path) =
            answering(&[br#"{"v":1,"ok":true,"#, br#""status":{"master":{"pid":42}}}"#, b"\n"]);
        assert_eq!(fetch(&path, Duration::from_secs(20)).unwrap().master.pid, 42);
        let (_dir, path) = answering(&[br#"{"v":1,"ok":true,"status":{}"#]);
        assert!(matches!(fetch(&path, Duration::from_secs(20)), Err(FetchError::Truncated)));
        let missing = tempfile::tempdir().unwrap();
        let e = fetch(&missing.path().join("no.sock"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, FetchError::Connect { .. }), "{e}");
    }
}
