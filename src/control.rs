//! The master's control socket (README, "Control"): `presup status`, `reload`, `stop`,
//! `scale`, `restart`, and the metrics server, each one JSON request and one JSON answer per
//! connection, each a line.
//!
//! Nothing here waits: the listener and every connection are non-blocking; a connection has
//! [`CLIENT_TIMEOUT`] to send its request and take its answer, a request is at most
//! [`MAX_REQUEST`] bytes, and at most [`MAX_CLIENTS`] are served at once. Only root and the
//! master's own user are answered (`SO_PEERCRED`). The master polls [`Control::poll_fds`]
//! and calls [`Control::on_ready`] when something may have happened; an idle control socket
//! adds no deadline, so an idle master still never wakes.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use crate::listener::BindError;
use serde_json::{json, Value};

/// The protocol's version, in every request and answer.
pub const VERSION: u64 = 1;
/// The largest request, its newline included.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Clients served at once; one more is told the master is busy.
pub const MAX_CLIENTS: usize = 64;
/// How long a client has to send its request and read its answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The default socket's name in the master's runtime directory.
pub const DEFAULT_NAME: &str = "control.sock";

/// A command, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
    Status,
    Reload,
    Stop { fast: bool },
    Scale(Scale),
    RestartSlot(usize),
    RestartSingleton(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    To(usize),
    By(i64),
}

impl Request {
    /// Parses one request line; the error is the text the client gets.
    pub fn parse(line: &[u8]) -> Result<Request, String> {
        let v: Value =
            serde_json::from_slice(line).map_err(|e| format!("the request is not JSON: {e}"))?;
        match v.get("v").and_then(Value::as_u64) {
            Some(VERSION) => {}
            other => {
                return Err(format!(
                    "protocol version {} is not spoken here (this master speaks {VERSION})",
                    other.map_or("(none)".to_owned(), |n| n.to_string())
                ))
            }
        }
        let command = v.get("command").and_then(Value::as_str).unwrap_or("");
        Ok(match command {
            "ping" => Request::Ping,
            "status" => Request::Status,
            "reload" => Request::Reload,
            "stop" => {
                Request::Stop { fast: v.get("fast").and_then(Value::as_bool).unwrap_or(false) }
            }
            "scale" => match (v.get("workers"), v.get("delta")) {
                (Some(n), None) => Request::Scale(Scale::To(
                    n.as_u64().ok_or("`workers` must be a positive integer")? as usize,
                )),
                (None, Some(d)) => {
                    Request::Scale(Scale::By(d.as_i64().ok_or("`delta` must be an integer")?))
                }
                _ => return Err("scale takes one of `workers` or `delta`".to_owned()),
            },
            "restart" => match (v.get("slot"), v.get("singleton")) {
                (Some(s), None) => Request::RestartSlot(
                    s.as_u64().ok_or("`slot` must be a non-negative integer")? as usize,
                ),
                (None, Some(name)) => Request::RestartSingleton(
                    name.as_str().ok_or("`singleton` must be a string")?.to_owned(),
                ),
                _ => return Err("restart takes one of `slot` or `singleton`".to_owned()),
            },
            "" => return Err("the request has no `command`".to_owned()),
            other => return Err(format!("unknown command {other:?}")),
        })
    }
}

/// An answer: `{"v":1,"ok":true, ...fields}`.
pub fn ok(fields: Value) -> Value {
    let mut answer = json!({ "v": VERSION, "ok": true });
    if let (Some(a), Value::Object(f)) = (answer.as_object_mut(), fields) {
        a.extend(f);
    }
    answer
}

/// An answer: `{"v":1,"ok":false,"error":why}`.
pub fn error(why: &str) -> Value {
    json!({ "v": VERSION, "ok": false, "error": why })
}

/// The name of the metrics server's singleton.
pub const METRICS_SINGLETON: &str = "presup-metrics";

/// With `[metrics]`, the metrics server (this program's `metrics-server`, reading the control
/// socket at `control`) becomes `config`'s first singleton, ready when it says `READY=1`.
pub fn add_metrics_server(config: &mut crate::config::Config, control: &Path) {
    config.singleton.retain(|s| s.name != METRICS_SINGLETON);
    let Some(metrics) = &config.metrics else { return };
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let command = vec![
        exe.display().to_string(),
        "metrics-server".into(),
        "--listen".into(),
        metrics.http.to_string(),
        "--control".into(),
        control.display().to_string(),
    ];
    let server = crate::config::Singleton::presup_server(METRICS_SINGLETON.to_owned(), command);
    config.singleton.insert(0, server);
}

/// A client's connection.
struct Client {
    id: u64,
    read_only: bool,
    stream: UnixStream,
    read: Vec<u8>,
    /// The answer, once there is one, and how much of it was written.
    answer: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// What the master must answer.
#[derive(Debug)]
pub struct Incoming {
    pub client: u64,
    pub request: Request,
    /// From the children's user (`user =`): only `ping` and `status` are answered.
    pub read_only: bool,
}

/// What [`Control::on_ready`] found besides requests: refusals to log.
#[derive(Debug, Default)]
pub struct Found {
    pub requests: Vec<Incoming>,
    /// Peers refused for their uid.
    pub refused: Vec<u32>,
}

/// The control socket and its clients.
pub struct Control {
    listener: UnixListener,
    path: PathBuf,
    /// Root and this uid are answered.
    uid: u32,
    /// The children's user (`user =`), answered for `ping` and `status` only (the metrics
    /// server runs as it).
    reader: Option<u32>,
    clients: Vec<Client>,
    next_id: u64,
    /// No accept before this instant: the last one failed for want of fds (EMFILE), and the
    /// listener, still readable, would wake the master at once.
    paused_until: Option<Instant>,
}

/// How long accepting pauses after it failed for want of fds.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

impl Control {
    /// Binds the socket at `path`, mode 0600; with `readers` (the children's uid and gid),
    /// 0660 and the children's group, which may then read the status. A stale socket (nobody
    /// listening) there is replaced; anything else there is an error.
    pub fn bind(path: &Path, readers: Option<(u32, u32)>) -> io::Result<Control> {
        // A stale socket file is replaced (never waiting on a live one's backlog); a live
        // one, or a file that is not a socket, is refused.
        let address = crate::config::Address::Unix(path.to_path_buf());
        match crate::listener::clear_stale_socket(path, &address) {
            Ok(()) => {}
            Err(BindError::InUse { .. }) => {
                let what = format!("{} is the control socket of a running master", path.display());
                return Err(io::Error::new(io::ErrorKind::AddrInUse, what));
            }
            Err(BindError::NotASocket { .. }) => {
                let what = format!("{} exists and is not a socket", path.display());
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, what));
            }
            Err(BindError::Os { source, .. }) => return Err(source),
            Err(other) => return Err(io::Error::other(other.to_string())),
        }
        // Made 0600 from the start: no instant when another user could connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound?;
        let uid = nix::unistd::geteuid().as_raw();
        let reader = match readers {
            Some((reader, gid)) if reader != uid && reader != 0 => {
                std::os::unix::fs::chown(path, None, Some(gid))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
                Some(reader)
            }
            _ => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                None
            }
        };
        listener.set_nonblocking(true)?;
        Ok(Control {
            listener,
            path: path.to_path_buf(),
            uid,
            reader,
            clients: Vec::new(),
            next_id: 1,
            paused_until: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fds to poll and what for: the listener (readable), each client (readable while it
    /// sends, writable while its answer waits).
    pub fn poll_fds(&self) -> Vec<(BorrowedFd<'_>, bool)> {
        let mut fds = Vec::new();
        if self.paused_until.is_none() {
            fds.push((self.listener.as_fd(), false));
        }
        fds.extend(self.clients.iter().map(|c| (c.stream.as_fd(), c.answer.is_some())));
        fds
    }

    pub fn raw_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let mut fds = vec![self.listener.as_raw_fd()];
        fds.extend(self.clients.iter().map(|c| c.stream.as_raw_fd()));
        fds
    }

    /// The nearest client deadline, if a client is connected.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients.iter().map(|c| c.deadline).chain(self.paused_until).min()
    }

    /// Accepts, reads and writes what can be now; drops clients past their deadline.
    pub fn on_ready(&mut self, now: Instant) -> Found {
        let mut found = Found::default();
        self.accept(now, &mut found);
        for c in &mut self.clients {
            if c.answer.is_none() {
                if let Some(request) = read_request(c) {
                    match request {
                        Ok(request) => {
                            let read_only = c.read_only;
                            found.requests.push(Incoming { client: c.id, request, read_only })
                        }
                        Err(why) => c.answer = Some((line(&error(&why)), 0)),
                    }
                }
            }
            if c.answer.is_none() && c.deadline <= now {
                let why = "timed out: a request must come whole within 5 s";
                c.answer = Some((line(&error(why)), 0));
            }
        }
        self.flush(now);
        found
    }

    /// Queues `answer` for `client` and writes what the socket takes now.
    pub fn answer(&mut self, client: u64, answer: &Value) {
        if let Some(c) = self.clients.iter_mut().find(|c| c.id == client) {
            c.answer = Some((line(answer), 0));
        }
        self.flush(Instant::now());
    }

    fn accept(&mut self, now: Instant, found: &mut Found) {
        if self.paused_until.is_some_and(|t| t > now) {
            return;
        }
        self.paused_until = None;
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Out of fds (EMFILE, ENFILE), or another transient error: the connection
                // waits in the backlog, and accepting pauses a moment.
                Err(_) => {
                    self.paused_until = Some(now + ACCEPT_PAUSE);
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let mut client = Client {
                id,
                read_only: false,
                stream,
                read: Vec::new(),
                answer: None,
                deadline: now + CLIENT_TIMEOUT,
            };
            let uid = getsockopt(&client.stream, PeerCredentials).map(|c| c.uid()).ok();
            match uid {
                Some(uid) if uid == 0 || uid == self.uid => {}
                Some(uid) if Some(uid) == self.reader => client.read_only = true,
                other => {
                    let uid = other.unwrap_or(u32::MAX);
                    found.refused.push(uid);
                    let why = format!(
                        "permission denied: uid {uid} is neither root nor the master's user ({})",
                        self.uid
                    );
                    client.answer = Some((line(&error(&why)), 0));
                }
            }
            if self.clients.len() >= MAX_CLIENTS && client.answer.is_none() {
                let why = format!("busy: {MAX_CLIENTS} clients are being served; try again");
                client.answer = Some((line(&error(&why)), 0));
            }
            self.clients.push(client);
        }
    }

    /// Writes pending answers; drops clients answered in full, gone, or past their deadline.
    fn flush(&mut self, now: Instant) {
        self.clients.retain_mut(|c| {
            let Some((bytes, written)) = &mut c.answer else { return c.deadline > now };
            while *written < bytes.len() {
                match c.stream.write(&bytes[*written..]) {
                    Ok(0) => return false,
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return c.deadline > now,
                    Err(_) => return false,
                }
            }
            false
        });
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads what the client sent; a whole line is its request. `None`: not yet.
fn read_request(c: &mut Client) -> Option<Result<Request, String>> {
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                // A client that closed its side without a newline: what it sent is all.
                return Some(if c.read.is_empty() {
                    Err("the request is empty".to_owned())
                } else {
                    Request::parse(&c.read)
                });
            }
            Ok(n) => {
                c.read.extend_from_slice(&buf[..n]);
                if let Some(end) = c.read.iter().position(|&b| b == b'\n') {
                    return Some(Request::parse(&c.read[..end]));
                }
                if c.read.len() > MAX_REQUEST {
                    return Some(Err(format!("the request is over {MAX_REQUEST} bytes")));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

fn line(answer: &Value) -> Vec<u8> {
    let mut bytes = answer.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn requests_parse_or_say_what_is_wrong() {
        let p = |s: &str| Request::parse(s.as_bytes());
        assert_eq!(p(r#"{"v":1,"command":"status"}"#), Ok(Request::Status));
        assert_eq!(p(r#"{"v":1,"command":"stop","fast":true}"#), Ok(Request::Stop { fast: true }));
        assert_eq!(p(r#"{"v":1,"command":"scale","workers":3}"#), Ok(Request::Scale(Scale::To(3))));
        assert_eq!(p(r#"{"v":1,"command":"scale","delta":-1}"#), Ok(Request::Scale(Scale::By(-1))));
        assert_eq!(p(r#"{"v":1,"command":"restart","slot":2}"#), Ok(Request::RestartSlot(2)));
        assert_eq!(
            p(r#"{"v":1,"command":"restart","singleton":"s"}"#),
            Ok(Request::RestartSingleton("s".into()))
        );
        assert!(p(r#"{"v":2,"command":"status"}"#).unwrap_err().contains("version 2"));
        assert!(p("garbage").unwrap_err().contains("not JSON"));
        assert!(p(r#"{"v":1,"command":"fly"}"#).unwrap_err().contains("unknown command"));
        assert!(p(r#"{"v":1,"command":"scale"}"#).unwrap_err().contains("one of"));
        assert!(p(r#"{"v":1,"command":"restart","slot":-1}"#).is_err());
    }

    fn exchange(path: &Path, request: &[u8]) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).unwrap();
        answer
    }

    /// Drives `control` on this thread until `done` says so.
    fn serve(control: &mut Control, mut each: impl FnMut(&mut Control, Found) -> bool) {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let found = control.on_ready(Instant::now());
            if each(control, found) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the client was not served in time");
    }

    #[test]
    fn a_request_line_gets_one_answer_line_and_garbage_gets_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let mut control = Control::bind(&path, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let p = path.clone();
        let client = std::thread::spawn(move || exchange(&p, b"{\"v\":1,\"command\":\"ping\"}\n"));
        serve(&mut control, |c, found| {
            let Some(r) = found.requests.into_iter().next() else { return false };
            assert_eq!(r.request, Request::Ping);
            c.answer(r.client, &ok(json!({ "pid": 1 })));
            true
        });
        let answer: Value = serde_json::from_str(&client.join().unwrap()).unwrap();
        assert_eq!((answer["ok"].as_bool(), answer["pid"].as_i64()), (Some(true), Some(1)));

        let p = path.clone();
        let client = std::thread::spawn(move || exchange(&p, b"not json\n"));
        serve(&mut control, |c, _| c.clients.is_empty() && client.is_finished());
        let answer: Value = serde_json::from_str(&client.join().unwrap()).unwrap();
        assert_eq!(answer["ok"], false);
        assert!(answer["error"].as_str().unwrap().contains("not JSON"));

        // A second master on the same path is refused; the first one's socket stays.
        let Err(e) = Control::bind(&path, None) else { panic!("a second bind succeeded") };
        assert!(e.to_string().contains("running master"), "{e}");
        drop(control);
        assert!(!path.exists(), "removed when dropped");
        // A stale socket is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        Control::bind(&path, None).unwrap();
    }

    #[test]
    fn an_oversized_request_is_refused_and_a_silent_client_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let mut control = Control::bind(&path, None).unwrap();
        let p = path.clone();
        let big = std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // Written in pieces: the master refuses once it has read over the limit.
            let chunk = vec![b'x'; 8192];
            for _ in 0..16 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
            let mut answer = String::new();
            let _ = std::io::BufReader::new(s).read_line(&mut answer);
            answer
        });
        serve(&mut control, |c, _| c.clients.is_empty() && big.is_finished());
        assert!(big.join().unwrap().contains("over 65536 bytes"));

        let silent = UnixStream::connect(&path).unwrap();
        control.on_ready(Instant::now());
        assert_eq!(control.clients.len(), 1);
        assert!(control.next_deadline().is_some());
        control.on_ready(Instant::now() + CLIENT_TIMEOUT);
        assert!(control.clients.is_empty(), "dropped at its deadline");
        let mut answer = String::new();
        std::io::BufReader::new(silent).read_line(&mut answer).unwrap();
        assert!(answer.contains("timed out"), "{answer}");
    }
}
