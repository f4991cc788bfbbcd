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

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use tracing::{debug, info, warn};

use super::{now, sleep_until, Ticket, TicketError};

/// gateway-queue's answer.
pub const MESSAGE: &str = "You're free to connect now! :)";
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: u64 = 1 << 20;
const MAX_CONNECTIONS: usize = 1024;
/// An idle kept-alive connection is closed after this.
const IDLE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Serves ticket `name` (from `PRESUP_TICKET_<NAME>`) on `addr`, forever.
pub fn run(name: &str, addr: SocketAddr) -> Result<(), ServerError> {
    // The master forwards USR1 (log reopening) to singletons; there is nothing to reopen here.
    let mut usr1 = nix::sys::signal::SigSet::empty();
    usr1.add(nix::sys::signal::Signal::SIGUSR1);
    let _ = usr1.thread_block();
    let ticket = Ticket::from_env(name)?;
    let listener = TcpListener::bind(addr).map_err(|source| ServerError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
    info!(ticket = %name, address = %bound, "ticket server listening");
    notify_ready(&format!("READY=1\nSTATUS=ticket {name} on http://{bound}/"));
    let buckets = ticket.params().buckets as usize;
    let server = Arc::new(Server {
        name: name.to_owned(),
        ticket,
        queues: (0..buckets).map(|_| Queue::default()).collect(),
        connections: AtomicUsize::new(0),
    });
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let server = Arc::clone(&server);
        if server.connections.fetch_add(1, Relaxed) >= MAX_CONNECTIONS {
            server.connections.fetch_sub(1, Relaxed);
            let _ = respond(&mut &stream, "1.1", 503, "too many connections", false, false);
            continue;
        }
        let spawned = std::thread::Builder::new().spawn(move || {
            server.serve(stream);
            server.connections.fetch_sub(1, Relaxed);
        });
        if let Err(e) = spawned {
            warn!("cannot start a connection thread: {e}");
        }
    }
    Ok(())
}

/// Tells the master we are up, if it listens (`NOTIFY_SOCKET`).
fn notify_ready(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = s.send_to(message.as_bytes(), path);
    }
}

struct Server {
    name: String,
    ticket: Ticket,
    queues: Vec<Queue>,
    connections: AtomicUsize,
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
    fn serve(&self, mut stream: TcpStream) {
        let _ = stream.set_read_timeout(Some(IDLE));
        let mut buf = Vec::new();
        loop {
            let req = match read_request(&mut stream, &mut buf) {
                Ok(Some(req)) => req,
                Ok(None) => return,
                Err(e) => {
                    if e.kind() == io::ErrorKind::InvalidData {
                        let _ = respond(&mut stream, "1.1", 400, &e.to_string(), false, false);
                    }
                    return;
                }
            };
            if discard_body(&mut stream, &mut buf, req.body).is_err() {
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
            if !self.wait_turn(shard, &stream) {
                return;
            }
            let ok = respond(&mut stream, req.version, 200, MESSAGE, req.keep_alive, req.head_only);
            if ok.is_err() || !req.keep_alive {
                return;
            }
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
            let left = Duration::from_nanos(r.at.saturating_sub(now()));
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
        sleep_until(r.at);
        let waited = Duration::from_nanos(r.at.saturating_sub(since));
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
/// head stays there). `None`: the client closed the connection between requests.
fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<Option<Request>> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
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

/// Reads and drops `len` body bytes (some may already be in `buf`).
fn discard_body(stream: &mut TcpStream, buf: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let have = (buf.len() as u64).min(len);
    buf.drain(..have as usize);
    let rest = len - have;
    if rest > 0 {
        let copied = io::copy(&mut (&mut *stream).take(rest), &mut io::sink())?;
        if copied < rest {
            return Err(io::ErrorKind::UnexpectedEof.into());
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
