//! The server end to end over real sockets: HTTP on a TcpListener, served by `run_on` on a
//! thread of the test, asking a stand-in master (a real UnixListener answering a canned STATUS
//! line) for its status. The stand-in names this test's own pid as the master and as a worker,
//! so that the `/proc` figures are real. (The real master: tests/metrics.rs.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// What the stand-in master does with a connection.
#[derive(Clone, Copy)]
enum Master {
    /// Answers a STATUS naming this process.
    Answer,
    /// Answers `ok: false`.
    Refuse,
    /// Reads the request and never answers (holds the connection).
    Hang,
}

/// A stand-in master on a real Unix socket; counts the status requests it was sent.
struct StandIn {
    _dir: tempfile::TempDir,
    path: PathBuf,
    requests: Arc<AtomicUsize>,
}

fn stand_in(mode: Master) -> StandIn {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&requests);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let mut line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            assert_eq!(line, "{\"v\":1,\"command\":\"status\"}\n");
            seen.fetch_add(1, Ordering::SeqCst);
            let me = std::process::id();
            let answer = match mode {
                Master::Answer => format!(
                    concat!(
                        r#"{{"v":1,"ok":true,"status":{{"master":{{"pid":{me},"version":"0.1.0","started_unix":1.5,"#,
                        r#""uptime_seconds":2.0,"generation":1,"workers_target":2}},"#,
                        r#""workers":[{{"slot":0,"pid":{me},"generation":1,"state":"up"}},"#,
                        r#"{{"slot":1,"pid":2147483646,"generation":1,"state":"starting"}}],"#,
                        r#""slots":[{{"slot":0,"restarts":3}},{{"slot":1,"restarts":0}}],"#,
                        r#""singletons":[{{"name":"a\"b","pid":null,"state":"failed","restarts":1}}]}}}}"#,
                        "\n"
                    ),
                    me = me
                ),
                Master::Refuse => "{\"v\":1,\"ok\":false,\"error\":\"busy\"}\n".to_owned(),
                Master::Hang => {
                    held.push(stream);
                    continue;
                }
            };
            let _ = (&stream).write_all(answer.as_bytes());
        }
    });
    StandIn { _dir: dir, path, requests }
}

/// A metrics server for `control`, serving on a thread of this test; its port.
fn server_for(control: PathBuf, request_timeout: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Server::new(control, Duration::from_millis(500), request_timeout);
    std::thread::spawn(move || server.run_on(listener).unwrap());
    port
}

struct Response {
    code: u16,
    head: String,
    body: String,
}

/// Sends `request` raw and reads the whole answer (the server closes after one).
fn send(port: u16, request: &[u8]) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("{out:?}"));
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    Response { code, head: head.to_owned(), body: body.to_owned() }
}

fn get(port: u16, path: &str) -> Response {
    send(port, format!("GET {path} HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n").as_bytes())
}

#[test]
fn a_scrape_asks_the_master_and_reads_proc() {
    let master = stand_in(Master::Answer);
    let port = server_for(master.path.clone(), Duration::from_secs(10));
    let r = get(port, "/metrics?name[]=x");
    assert_eq!(r.code, 200, "{}", r.body);
    assert!(
        r.head.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        r.head
    );
    let length: usize =
        r.head.lines().find_map(|l| l.strip_prefix("content-length: ")).unwrap().parse().unwrap();
    assert_eq!(length, r.body.len());
    assert_eq!(master.requests.load(Ordering::SeqCst), 1);
    let me = std::process::id();
    let body = &r.body;
    assert!(body.contains("\npresup_up 1\n"), "{body}");
    assert!(body.contains("presup_workers{state=\"up\"} 1\n"), "{body}");
    assert!(body.contains("presup_workers{state=\"starting\"} 1\n"), "{body}");
    assert!(body.contains("presup_worker_restarts_total{slot=\"0\"} 3\n"), "{body}");
    assert!(body.contains("presup_singleton_up{name=\"a\\\"b\"} 0\n"), "{body}");
    // This process's memory, read by the server; the pid that does not exist is skipped.
    let rss = format!("presup_worker_resident_memory_bytes{{slot=\"0\",pid=\"{me}\"}} ");
    let value: u64 = body.split(&rss).nth(1).unwrap().lines().next().unwrap().parse().unwrap();
    assert!(value > 0);
    assert!(!body.contains("2147483646"), "{body}");
    for name in [
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(body.contains(&format!("\n{name}")), "{name} in {body}");
    }
    // HEAD: the same head, no body.
    let r = send(port, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!((r.code, r.body.as_str()), (200, ""));
    assert_eq!(master.requests.load(Ordering::SeqCst), 2);
}

#[test]
fn other_requests_and_bad_clients_are_answered_or_dropped_and_the_server_carries_on() {
    let master = stand_in(Master::Answer);
    let port = server_for(master.path.clone(), Duration::from_secs(1));
    assert_eq!(get(port, "/").code, 404);
    assert_eq!(get(port, "/metricsx").code, 404);
    let r = send(port, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(r.code, 405);
    assert!(r.head.contains("allow: GET, HEAD"));
    assert_eq!(send(port, b"\x00\x01\x02 nonsense\r\n\r\n").code, 400);
    // A head that never ends: refused past 8 KiB (the server stops reading).
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    long.resize(20 * 1024, b'a');
    let _ = s.write_all(&long);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 400 "), "{out:?}");
    // A client that hangs up at once, one that sends half a request and hangs up, one that
    // sends nothing and is cut after the request timeout.
    drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(b"GET /met").unwrap();
    drop(half);
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // Meanwhile another client is served.
    assert_eq!(get(port, "/metrics").code, 200);
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).unwrap(), 0, "closed without an answer");
    assert!(start.elapsed() < Duration::from_secs(15));
    assert_eq!(get(port, "/metrics").code, 200);
    assert_eq!(master.requests.load(Ordering::SeqCst), 2, "only the scrapes asked the master");
}

#[test]
fn connections_past_the_limit_are_answered_503_at_once() {
    let master = stand_in(Master::Answer);
    let port = server_for(master.path.clone(), Duration::from_secs(30));
    let idle: Vec<TcpStream> =
        (0..MAX_CONNECTIONS).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    let r = get(port, "/metrics");
    assert_eq!(r.code, 503, "{}", r.body);
    assert_eq!(master.requests.load(Ordering::SeqCst), 0);
    // Once one of them is done, there is room again.
    drop(idle);
    crate_wait("a scrape once the idle connections are gone", || get(port, "/metrics").code == 200);
}

#[test]
fn a_master_that_cannot_be_asked_makes_503_with_presup_up_0() {
    let dir = tempfile::tempdir().unwrap();
    let port = server_for(dir.path().join("none.sock"), Duration::from_secs(10));
    let r = get(port, "/metrics");
    assert_eq!(r.code, 503);
    assert!(r.head.contains("content-type: text/plain; version=0.0.4"), "{}", r.head);
    assert!(r.body.contains("cannot connect to the control socket"), "{}", r.body);
    assert!(r.body.ends_with("\npresup_up 0\n"), "{}", r.body);

    let refusing = stand_in(Master::Refuse);
    let r = get(server_for(refusing.path.clone(), Duration::from_secs(10)), "/metrics");
    assert_eq!(r.code, 503);
    assert!(r.body.contains("the master says: busy"), "{}", r.body);

    // A master that never answers: 503 after the control timeout (500 ms here), not never.
    let hanging = stand_in(Master::Hang);
    let r = get(server_for(hanging.path.clone(), Duration::from_secs(10)), "/metrics");
    assert_eq!(r.code, 503);
    assert!(r.body.contains("no answer within 500ms"), "{}", r.body);
    assert_eq!(hanging.requests.load(Ordering::SeqCst), 1);
}

/// Polls `f` until true, with the integration tests' generous deadline.
fn crate_wait(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
