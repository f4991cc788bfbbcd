//! The ticket server: ticket `NAME` over HTTP, in twilight gateway-queue's protocol, so that a
//! bot written against gateway-queue works unchanged. Run by the master as the singleton
//! `ticket:NAME` (`presup ticket-server NAME --listen ADDR`) when the ticket has `http`.
//!
//! Any method, any path, headers and body ignored; the query's `shard` picks the bucket
//! (`shard % buckets`; without it, bucket 0, and a log line). The answer, once the turn has
//! come, is `200` with `{"message": "You're free to connect now! :)"}`. Connections are kept
//! alive (HTTP/1.1), one thread each.
//!
//! Waiting requests queue in this process, per bucket, in arrival order; only the head of a
//! bucket's queue holds a reservation in the ticket. So a client that hangs up while it waits
//! costs nothing: when its turn in the queue comes, it is seen gone and skipped; if it hangs
//! up while it is the head (seen at once: its socket is polled for the hang-up until the
//! grant), its reservation is given back to the ticket.
//!
//! What a client may hold is bounded ([`table`]): a new connection must send its request within
//! the request timeout (10 s), a kept-alive one its next request within [`IDLE`]; a request
//! head (and body) must be complete within the request timeout of its first byte; when the
//! table is full the connection idle the longest is closed for the new one, and a remote
//! address holds at most [`table::PER_ADDRESS`] idle ones. A request waiting for its turn is
//! never cut.
//! The server raises its soft fd limit to the hard one and sizes its table below it; should
//! `accept` still run out of fds, a reserve fd is given up to take the connection off the
//! queue and answer it 503, rather than retrying at once.

mod table;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use self::table::{Admit, Table};
use super::{now, Ticket, TicketError};

/// gateway-queue's answer.
pub const MESSAGE: &str = "You're free to connect now! :)";
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: u64 = 1 << 20;
/// At most this many connections (one thread each), fewer if the fd limit says so.
const MAX_CONNECTIONS: usize = 1024;
/// Fds kept out of the table: the listener, stdio, the reserve, connections being closed.
const FD_RESERVE: u64 = 64;
/// A kept-alive connection with no request is closed after this (longer than the 90 s that
/// HTTP client pools such as hyper's keep an idle connection, so that the client, not the
/// server, is the one to close it).
pub const IDLE: Duration = Duration::from_secs(300);
/// The default request timeout: a new connection's first request, and any request from its
/// first byte, must be complete within it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Warnings about refused connections are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Serves ticket `name` (from `PRESUP_TICKET_<NAME>`) on `addr`, forever. `request_timeout`:
/// see [`REQUEST_TIMEOUT`].
pub fn run(name: &str, addr: SocketAddr, request_timeout: Duration) -> Result<(), ServerError> {
    // The master forwards USR1 (log reopening) to singletons; there is nothing to reopen here.
    let mut usr1 = nix::sys::signal::SigSet::empty();
    usr1.add(nix::sys::signal::Signal::SIGUSR1);
    let _ = usr1.thread_block();
    let ticket = Ticket::from_env(name)?;
    let fds = raise_fd_limit();
    let capacity = (fds.saturating_sub(FD_RESERVE) as usize).min(MAX_CONNECTIONS);
    let listener = TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
    let table = Table::new(capacity, table::PER_ADDRESS);
    let max_connections = table.capacity();
    info!(ticket = %name, address = %bound, max_connections, "ticket server listening");
    crate::notify::tell(&format!("READY=1\nSTATUS=ticket {name} on http://{bound}/"));
    let buckets = ticket.params().buckets as usize;
    let server = Arc::new(Server {
        name: name.to_owned(),
        ticket,
        queues: (0..buckets).map(|_| Queue::default()).collect(),
        table: Mutex::new(table),
        ended: Condvar::new(),
        request_timeout,
    });
    let mut acceptor = Acceptor { spare: File::open("/dev/null").ok(), warned: None, quiet: 0 };
    loop {
        match listener.accept() {
            Ok((stream, peer)) => acceptor.admit(&server, stream, peer.ip()),
            Err(e) => acceptor.failed(&listener, e),
        }
    }
}

/// Raises the soft limit on open fds to the hard one; returns the soft limit now in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource::RLIMIT_NOFILE};
    let Ok((soft, hard)) = getrlimit(RLIMIT_NOFILE) else { return 1024 };
    if soft < hard && setrlimit(RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// The accepting thread's state.
struct Acceptor {
    /// An fd held in reserve, given up to accept (and refuse) a connection when out of fds.
    spare: Option<File>,
    /// When the last warning about refused connections was logged, and how many were not.
    warned: Option<Instant>,
    quiet: u64,
}

impl Acceptor {
    /// Serves the new connection `stream` from `peer` on a thread of its own, if there is room
    /// (made by closing the connection idle the longest, if need be); else answers 503.
    fn admit(&mut self, server: &Arc<Server>, stream: TcpStream, peer: IpAddr) {
        let stream = Arc::new(stream);
        let id = {
            let mut table = server.table();
            loop {
                match table.admit(peer) {
                    Admit::Refuse => break None,
                    // A closed connection's thread ends at once: its read returns.
                    Admit::Wait => {
                        table = server.ended.wait(table).unwrap_or_else(|p| p.into_inner())
                    }
                    admit => {
                        if let Admit::Evict(old) = admit {
                            if let Some(s) = table.evict(old) {
                                // Its thread's read returns at once; the thread closes the fd.
                                let _ = s.shutdown(Shutdown::Both);
                                debug!(ticket = %server.name, "idle connection closed to make room");
                            }
                        }
                        break Some(table.insert(peer, Arc::clone(&stream), Instant::now()));
                    }
                }
            }
        };
        let Some(id) = id else {
            let _ = stream.set_nonblocking(true);
            let _ = respond(&mut &*stream, "1.1", 503, "too many connections", false, false);
            self.warn(&format!("connection from {peer} refused: every connection is busy"));
            return;
        };
        let thread = Arc::clone(server);
        let spawned = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || thread.serve(id, stream));
        if let Err(e) = spawned {
            server.table().remove(id);
            server.ended.notify_all();
            self.warn(&format!("cannot start a connection thread: {e}"));
        }
    }

    /// `accept` failed with `e`. Out of fds, the connection at the head of the queue would make
    /// every `accept` fail at once again: the reserve fd makes room to take it and answer 503.
    /// Other failures (the network's, memory) pause accepting for a moment.
    fn failed(&mut self, listener: &TcpListener, e: io::Error) {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => {
                drop(self.spare.take());
                if let Ok((stream, _)) = listener.accept() {
                    let _ = stream.set_nonblocking(true);
                    let _ =
                        respond(&mut &stream, "1.1", 503, "out of file descriptors", false, false);
                }
                self.spare = File::open("/dev/null").ok();
                if self.spare.is_none() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                self.warn(&format!("out of file descriptors ({e}): connection refused"));
            }
            Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN) => {}
            _ => {
                self.warn(&format!("cannot accept a connection: {e}"));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Logs `what` at most every [`WARN_EVERY`], counting what was not logged.
    fn warn(&mut self, what: &str) {
        let now = Instant::now();
        if self.warned.is_some_and(|at| now < at + WARN_EVERY) {
            self.quiet += 1;
            return;
        }
        match std::mem::take(&mut self.quiet) {
            0 => warn!("{what}"),
            n => warn!("{what} ({n} more such since the last warning)"),
        }
        self.warned = Some(now);
    }
}

struct Server {
    name: String,
    ticket: Ticket,
    queues: Vec<Queue>,
    table: Mutex<Table<Arc<TcpStream>>>,
    /// Signalled when a connection's thread has ended, its fd closed.
    ended: Condvar,
    request_timeout: Duration,
}

/// One bucket's waiting requests in this process: a ticket lock (take a number, wait until it
/// is served).
#[derive(Default)]
struct Queue {
    numbers: Mutex<Numbers>,
    turn: Condvar,
}

#[derive(Default)]
struct Numbers {
    next: u64,
    serving: u64,
}

/// The head of a queue: passes the turn on when dropped.
struct Head<'a>(&'a Queue);

impl Drop for Head<'_> {
    fn drop(&mut self) {
        let mut n = self.0.numbers.lock().unwrap_or_else(|p| p.into_inner());
        n.serving += 1;
        self.0.turn.notify_all();
    }
}

impl Queue {
    fn wait_head(&self) -> Head<'_> {
        let mut n = self.numbers.lock().unwrap_or_else(|p| p.into_inner());
        let mine = n.next;
        n.next += 1;
        while n.serving != mine {
            n = self.turn.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        Head(self)
    }
}

/// A parsed request: what matters of it.
struct Request {
    version: &'static str,
    head_only: bool,
    shard: Option<Result<u64, String>>,
    keep_alive: bool,
    body: u64,
}

impl Server {
    fn table(&self) -> MutexGuard<'_, Table<Arc<TcpStream>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves connection `id` until it ends, then takes it out of the table.
    fn serve(&self, id: u64, stream: Arc<TcpStream>) {
        let _ = stream.set_write_timeout(Some(self.request_timeout));
        self.serve_requests(id, &stream);
        let mut table = self.table();
        table.remove(id);
        // The fd is closed before the acceptor, woken, counts the room it leaves.
        drop(stream);
        drop(table);
        self.ended.notify_all();
    }

    fn serve_requests(&self, id: u64, stream: &TcpStream) {
        let mut stream = stream;
        let mut buf = Vec::new();
        let mut wait = self.request_timeout;
        loop {
            let req = match read_request(stream, &mut buf, wait, self.request_timeout) {
                Ok(Some(req)) => req,
                Ok(None) => return,
                Err(e) => {
                    match e.kind() {
                        io::ErrorKind::InvalidData => {
                            let _ = respond(&mut stream, "1.1", 400, &e.to_string(), false, false);
                        }
                        io::ErrorKind::TimedOut => {
                            debug!(ticket = %self.name, "connection closed: no request in time")
                        }
                        _ => {}
                    }
                    return;
                }
            };
            if discard_body(stream, &mut buf, req.body, self.request_timeout).is_err() {
                return;
            }
            // Busy from here: never closed to make room. False: it was, just now.
            if !self.table().set(id, None) {
                return;
            }
            let shard = match &req.shard {
                Some(Ok(shard)) => *shard,
                None => {
                    info!(ticket = %self.name, "request without shard: bucket 0");
                    0
                }
                Some(Err(raw)) => {
                    warn!(ticket = %self.name, shard = %raw, "request with an invalid shard: bucket 0");
                    0
                }
            };
            if !self.wait_turn(shard, stream) {
                return;
            }
            let ok = respond(&mut stream, req.version, 200, MESSAGE, req.keep_alive, req.head_only);
            if ok.is_err() || !req.keep_alive || !self.table().set(id, Some(Instant::now())) {
                return;
            }
            wait = IDLE;
        }
    }

    /// Waits for `shard`'s turn; false if the client hung up first.
    fn wait_turn(&self, shard: u64, stream: &TcpStream) -> bool {
        let bucket = self.ticket.bucket(shard);
        let _head = self.queues[bucket as usize].wait_head();
        if hung_up(stream, Duration::ZERO) {
            debug!(ticket = %self.name, shard, "client gone before its turn: skipped");
            return false;
        }
        let since = now();
        let r = self.ticket.reserve(shard, None).expect("no deadline");
        loop {
            let left = Duration::from_nanos(r.at_ns().saturating_sub(now()));
            if left < Duration::from_millis(1) {
                break;
            }
            if hung_up(stream, left) {
                let returned = self.ticket.cancel(&r);
                let what = if returned { "given back" } else { "passes unused" };
                info!(ticket = %self.name, shard, bucket, "client hung up while waiting; its turn {what}");
                return false;
            }
        }
        r.wait();
        let waited = Duration::from_nanos(r.at_ns().saturating_sub(since));
        debug!(ticket = %self.name, shard, bucket, waited = ?waited, "granted");
        true
    }
}

/// Whether the peer hung up, waiting up to `wait` (rounded down to ms) to find out.
fn hung_up(stream: &TcpStream, wait: Duration) -> bool {
    let ms = wait.as_millis().min(60_000) as u16;
    // POLLRDHUP: the peer closed its end (nix has no name for it). Only that is asked for,
    // so that a pipelined next request (POLLIN) does not end the wait.
    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [PollFd::new(stream.as_fd(), rdhup)];
    // Only POLLRDHUP was asked for; the kernel adds POLLHUP, POLLERR, POLLNVAL: each says the
    // client is gone. (nix's `revents()` cannot show POLLRDHUP, so the count is what tells.)
    match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => n > 0,
        Err(nix::errno::Errno::EINTR) => false,
        Err(_) => true,
    }
}

/// Reads one request head from `stream` (bytes already read are in `buf`; what follows the
/// head stays there): its first byte within `wait`, all of it within `timeout` of its first
/// byte (and of `wait`'s end). `None`: the client closed the connection between requests;
/// `TimedOut`: it was too slow.
fn read_request(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    wait: Duration,
    timeout: Duration,
) -> io::Result<Option<Request>> {
    let start = Instant::now();
    let mut deadline = start + if buf.is_empty() { wait } else { wait.min(timeout) };
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
        }
        let mut chunk = [0u8; 4096];
        let n = read_until(stream, &mut chunk, deadline)?;
        if n == 0 {
            return Ok(None);
        }
        if buf.is_empty() {
            deadline = deadline.min(Instant::now() + timeout);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head: Vec<u8> = buf.drain(..end).collect();
    parse_head(&String::from_utf8_lossy(&head)).map(Some)
}

fn parse_head(head: &str) -> io::Result<Request> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let version = match version {
        "HTTP/1.1" => "1.1",
        "HTTP/1.0" => "1.0",
        _ => return Err(bad("unsupported HTTP version")),
    };
    let mut req = Request {
        version,
        head_only: method == "HEAD",
        shard: query_shard(target),
        keep_alive: version == "1.1",
        body: 0,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                req.body = value.parse().map_err(|_| bad("invalid content-length"))?;
                if req.body > MAX_BODY {
                    return Err(bad("request body too large"));
                }
            }
            "transfer-encoding" => return Err(bad("chunked request bodies are not supported")),
            "connection" if value.eq_ignore_ascii_case("close") => req.keep_alive = false,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => req.keep_alive = true,
            _ => {}
        }
    }
    Ok(req)
}

/// The `shard` query parameter: `None` if absent, `Err(raw)` if not a number.
fn query_shard(target: &str) -> Option<Result<u64, String>> {
    let query = target.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or("");
    let raw = query.split('&').find_map(|kv| kv.strip_prefix("shard="))?;
    Some(raw.parse().map_err(|_| raw.to_owned()))
}

/// Reads into `chunk` what `stream` has, waiting until `deadline` at most (`TimedOut` then).
fn read_until(stream: &TcpStream, chunk: &mut [u8], deadline: Instant) -> io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    stream.set_read_timeout(Some(left))?;
    match (&mut &*stream).read(chunk) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
        r => r,
    }
}

/// Reads and drops `len` body bytes (some may already be in `buf`), within `timeout`.
fn discard_body(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    len: u64,
    timeout: Duration,
) -> io::Result<()> {
    let have = (buf.len() as u64).min(len);
    buf.drain(..have as usize);
    let mut rest = len - have;
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    while rest > 0 {
        let want = rest.min(chunk.len() as u64) as usize;
        match read_until(stream, &mut chunk[..want], deadline)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => rest -= n as u64,
        }
    }
    Ok(())
}

fn respond(
    stream: &mut impl Write,
    version: &str,
    code: u16,
    message: &str,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        _ => "Service Unavailable",
    };
    let body = format!("{{\"message\": {}}}", json_string(message));
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out = format!(
        "HTTP/{version} {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    stream.write_all(out.as_bytes())
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_gateway_queue_clients_send() {
        let r = parse_head("GET /?shard=42 HTTP/1.1\r\nHost: q\r\n\r\n").unwrap();
        assert_eq!((r.version, r.keep_alive, r.head_only, r.body), ("1.1", true, false, 0));
        assert_eq!(r.shard, Some(Ok(42)));
        let r = parse_head("POST /any/path?x=1&shard=7#f HTTP/1.0\r\nContent-Length: 5\r\n\r\n")
            .unwrap();
        assert_eq!((r.version, r.keep_alive, r.body, r.shard), ("1.0", false, 5, Some(Ok(7))));
        let r = parse_head("HEAD / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!((r.head_only, r.keep_alive, r.shard), (true, false, None));
        assert_eq!(
            parse_head("GET /?shard=x HTTP/1.1\r\n\r\n").unwrap().shard,
            Some(Err("x".into()))
        );
        assert!(parse_head("GET /\r\n\r\n").is_err());
        assert!(parse_head("GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert_eq!(json_string("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
