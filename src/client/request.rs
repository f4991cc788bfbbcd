//! One request to the master's control socket: connect, write one JSON object and `\n`, read
//! one line back (or up to EOF), all within [`TIMEOUT`], so that a master that hangs (or a
//! socket nobody accepts on) is an error, never a hang of the CLI.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use serde_json::{Map, Value};

/// How long one request may take, connect to answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The largest answer read (a STATUS of 1024 workers is far below it).
const MAX_ANSWER: u64 = 64 << 20;

/// Why a request got no answer of the master's.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing listens there (ENOENT, ECONNREFUSED): no master, or one that is gone.
    #[error("cannot connect to {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("{path}: no answer within {}", humantime::format_duration(*.timeout))]
    Timeout { path: String, timeout: Duration },
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: the answer is not the protocol's: {why}")]
    Garbled { path: String, why: String },
}

impl RequestError {
    /// Whether the socket has no master behind it (a stale socket file, or none at all),
    /// as opposed to one that answered wrong or too late.
    pub fn nobody_there(&self) -> bool {
        matches!(self, RequestError::Connect { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOENT) | Some(libc::ECONNREFUSED)))
    }
}

/// Sends `{"v":1,"command":command, ...fields}` to the socket at `path` and returns the
/// master's answer, whether `ok` is true or false (see [`answer_result`]).
pub fn send(path: &Path, command: &str, fields: Map<String, Value>) -> Result<Value, RequestError> {
    send_within(path, command, fields, TIMEOUT)
}

/// [`send`] with another timeout than [`TIMEOUT`].
pub fn send_within(
    path: &Path,
    command: &str,
    fields: Map<String, Value>,
    timeout: Duration,
) -> Result<Value, RequestError> {
    let mut request = Map::new();
    request.insert("v".into(), 1.into());
    request.insert("command".into(), command.into());
    request.extend(fields);
    let mut line = Value::Object(request).to_string();
    line.push('\n');
    exchange(path, line.as_bytes(), timeout)
}

/// The answer's fields when `ok` is true, its `error` text when false.
pub fn answer_result(answer: Value) -> Result<Map<String, Value>, String> {
    let Value::Object(map) = answer else { return Err("the answer is not an object".into()) };
    match map.get("ok") {
        Some(Value::Bool(true)) => Ok(map),
        _ => Err(map
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("the master refused the request without saying why")
            .to_owned()),
    }
}

fn exchange(path: &Path, line: &[u8], timeout: Duration) -> Result<Value, RequestError> {
    let shown = path.display().to_string();
    let deadline = Instant::now() + timeout;
    let io_error = |source: io::Error| {
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            RequestError::Timeout { path: shown.clone(), timeout }
        } else {
            RequestError::Io { path: shown.clone(), source }
        }
    };
    let stream = open(path, deadline).map_err(|source| match source.kind() {
        // A blocking connect to a socket whose backlog is full waits, up to SO_SNDTIMEO.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            RequestError::Timeout { path: shown.clone(), timeout }
        }
        _ => RequestError::Connect { path: shown.clone(), source },
    })?;
    let mut stream = stream;
    set_timeouts(&stream, deadline).map_err(io_error)?;
    // A master that refuses a client answers at once and closes, maybe before the request
    // is written: its answer is still there to read.
    let unsent = match stream.write_all(line) {
        Ok(()) => None,
        Err(e)
            if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) =>
        {
            Some(e)
        }
        Err(e) => return Err(io_error(e)),
    };
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        set_timeouts(&stream, deadline).map_err(io_error)?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if unsent.is_some() && e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(io_error(e)),
        };
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.iter().position(|&b| b == b'\n') {
            answer.truncate(end);
            break;
        }
        if answer.len() as u64 > MAX_ANSWER {
            return Err(RequestError::Garbled { path: shown, why: "over 64 MiB".into() });
        }
    }
    if answer.is_empty() {
        if let Some(source) = unsent {
            return Err(RequestError::Io { path: shown, source });
        }
        let why = "the master closed the connection without answering".to_owned();
        return Err(RequestError::Garbled { path: shown, why });
    }
    let value: Value = serde_json::from_slice(&answer)
        .map_err(|e| RequestError::Garbled { path: shown.clone(), why: e.to_string() })?;
    if value.get("v").and_then(Value::as_u64) != Some(1) {
        let why =
            format!("version {} (this presup speaks 1)", value.get("v").unwrap_or(&Value::Null));
        return Err(RequestError::Garbled { path: shown, why });
    }
    Ok(value)
}

/// A connected stream to `path`; the connect waits at most until `deadline`.
fn open(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd: OwnedFd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::SendTimeout, &timeval(deadline))?;
    loop {
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
            Ok(()) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(UnixStream::from(fd))
}

fn set_timeouts(stream: &UnixStream, deadline: Instant) -> io::Result<()> {
    let left = remaining(deadline)?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

fn timeval(deadline: Instant) -> TimeVal {
    let left = remaining(deadline).unwrap_or(Duration::from_millis(1));
    TimeVal::new(left.as_secs() as _, left.subsec_micros() as _)
}

/// The time left before `deadline` (never zero, which would mean "no timeout" to the kernel).
fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left.max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    #[test]
    fn one_line_each_way() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            (&conn).write_all(b"{\"v\":1,\"ok\":false,\"error\":\"no such slot\"}\n").unwrap();
            line
        });
        let mut fields = Map::new();
        fields.insert("slot".into(), 7.into());
        let answer = send(&path, "restart", fields).unwrap();
        assert_eq!(answer_result(answer).unwrap_err(), "no such slot");
        let sent: Value = serde_json::from_str(&server.join().unwrap()).unwrap();
        assert_eq!(sent, serde_json::json!({"v": 1, "command": "restart", "slot": 7}));
    }

    #[test]
    fn an_answer_before_the_request_is_read_is_still_read() {
        // As a master refusing a client: it answers at once and closes without reading, so
        // the rest of the request (too big for the socket's buffer) cannot be written.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            (&conn).write_all(b"{\"v\":1,\"ok\":false,\"error\":\"permission denied\"}\n").unwrap();
        });
        let mut fields = Map::new();
        fields.insert("pad".into(), "x".repeat(4 << 20).into());
        let answer = send(&path, "ping", fields).unwrap();
        assert_eq!(answer_result(answer).unwrap_err(), "permission denied");
    }

    #[test]
    fn a_master_that_never_answers_is_an_error_not_a_hang() {
        // Accepted by the kernel (the backlog), never read nor answered: the read times out.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let err = send_within(&path, "ping", Map::new(), timeout).unwrap_err();
        assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
        assert!(started.elapsed() >= timeout && started.elapsed() < timeout * 10);
        assert!(err.to_string().ends_with("no answer within 300ms"), "{err}");
    }

    #[test]
    fn a_stale_socket_is_nobody_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        drop(UnixListener::bind(&path).unwrap());
        let err = send(&path, "ping", Map::new()).unwrap_err();
        assert!(err.nobody_there(), "{err}");
        let err = send(&dir.path().join("none.sock"), "ping", Map::new()).unwrap_err();
        assert!(err.nobody_there(), "{err}");
    }
}
