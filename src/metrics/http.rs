//! The little HTTP the metrics server speaks: one request per connection (`connection:
//! close`), its head at most [`MAX_HEAD`] bytes and complete within a timeout, any body left
//! unread; `GET` or `HEAD` of `/metrics` (any query) is a scrape, another path 404, another
//! method 405.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The most a request head may be.
pub const MAX_HEAD: usize = 8 * 1024;

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics` (`head_only`: `HEAD`).
    Scrape {
        head_only: bool,
    },
    NotFound,
    MethodNotAllowed,
    Malformed(&'static str),
}

/// Reads one request head within `timeout` of now. `None`: the client closed or sent nothing
/// in time (nothing to answer).
pub fn read_request(stream: &TcpStream, timeout: Duration) -> Option<Request> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = head_end(&buf) {
            return Some(parse_head(&buf[..end]));
        }
        if buf.len() > MAX_HEAD {
            return Some(Request::Malformed("request head too long"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return None;
        }
        match (&mut &*stream).read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// The end of the head: after the blank line (CRLF, or bare LF as lenient servers take it).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub fn parse_head(head: &[u8]) -> Request {
    let head = String::from_utf8_lossy(head);
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Malformed("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Malformed("unsupported HTTP version");
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path != "/metrics" {
        return Request::NotFound;
    }
    match method {
        "GET" => Request::Scrape { head_only: false },
        "HEAD" => Request::Scrape { head_only: true },
        _ => Request::MethodNotAllowed,
    }
}

/// Writes a whole response and closes the connection's writing side.
pub fn respond(
    stream: &TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let allow = if code == 405 { "allow: GET, HEAD\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{allow}connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    (&mut &*stream).write_all(out.as_bytes())?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// After an answer to a request not read whole (a bad one, one with a body): reads and drops
/// what the client still sends, for a second or 64 KiB at most, so that closing with unread
/// bytes does not reset the connection before the client has read the answer.
pub fn drain(stream: &TcpStream) {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut left: usize = 64 * 1024;
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        if wait.is_zero() || stream.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match (&mut &*stream).read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_scrapes_and_refuses_the_rest() {
        let p = |s: &str| parse_head(s.as_bytes());
        assert_eq!(
            p("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Request::Scrape { head_only: false }
        );
        assert_eq!(p("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Request::Scrape { head_only: false });
        assert_eq!(p("HEAD /metrics HTTP/1.1\r\n\r\n"), Request::Scrape { head_only: true });
        assert_eq!(p("GET / HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(p("GET /metrics/x HTTP/1.1\r\n\r\n"), Request::NotFound);
        assert_eq!(p("POST /metrics HTTP/1.1\r\n\r\n"), Request::MethodNotAllowed);
        assert!(matches!(p("GET /metrics\r\n\r\n"), Request::Malformed(_)));
        assert!(matches!(p("GET /metrics HTTP/2\r\n\r\n"), Request::Malformed(_)));
        assert!(matches!(p("\u{0}\u{1} garbage"), Request::Malformed(_)));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nA: b\r\n\r\n"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n"), None);
    }
}
