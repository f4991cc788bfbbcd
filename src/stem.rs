//! The master's side of the stem protocol (README, "The stem protocol").
//!
//! With `[workers] preload = true` the master starts `[workers] command` once, as the *stem*:
//! the app is imported there, then the client library (the `presup` Python package) serves
//! fork requests. The two talk over a `socketpair(AF_UNIX, SOCK_SEQPACKET)`: the stem gets one
//! end as `PRESUP_STEM_FD`, the master keeps the other in a [`Channel`]. One message per packet
//! (the transport frames them), each a JSON object of at most [`MAX_MESSAGE`] bytes with
//! `"v": 1` and a `"type"`:
//!
//! - master → stem: `fork` (`id`, `slot`, `generation`, the worker's complete `env`, and the
//!   `pid_vars` the worker sets to its own pid);
//! - stem → master: `ready`, `refused` (`error`: it cannot serve, and exits), `forked` (`id`,
//!   `pid`), `fork_failed` (`id`, `error`).
//!
//! The master's end is non-blocking: a request the socket cannot take now waits in an outbox
//! flushed when the socket is writable, and reads drain what is there. Nothing here waits.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};
use nix::unistd::Pid;
use serde_json::{json, Value};

/// The protocol's version, in every message.
pub const VERSION: u64 = 1;

/// The largest message either side sends, in bytes.
pub const MAX_MESSAGE: usize = 128 * 1024;

/// The variable that names the stem's end of the socket pair.
pub const FD_VAR: &str = "PRESUP_STEM_FD";

/// A fork request: a worker for `slot` of `generation` with exactly `env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub id: u64,
    pub slot: usize,
    pub generation: u64,
    pub env: &'a [(String, String)],
    pub pid_vars: &'a [&'static str],
}

impl Request<'_> {
    /// The request as one packet, or why it cannot be sent.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let env: serde_json::Map<String, Value> =
            self.env.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let message = json!({
            "v": VERSION,
            "type": "fork",
            "id": self.id,
            "slot": self.slot,
            "generation": self.generation,
            "env": env,
            "pid_vars": self.pid_vars,
        });
        let bytes = message.to_string().into_bytes();
        if bytes.len() > MAX_MESSAGE {
            return Err(format!(
                "the worker's environment makes a fork request of {} bytes; the stem protocol \
                 carries at most {MAX_MESSAGE}",
                bytes.len()
            ));
        }
        Ok(bytes)
    }
}

/// A message from the stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromStem {
    /// The app is loaded; the stem serves fork requests.
    Ready,
    /// The stem cannot serve (more than one thread, say), and exits.
    Refused(String),
    Forked {
        id: u64,
        pid: Pid,
    },
    ForkFailed {
        id: u64,
        error: String,
    },
    /// A message of version 1 with a type this master does not know: ignored.
    Unknown(String),
}

impl FromStem {
    /// Parses one packet; an error is a broken peer (not JSON, another version, a field
    /// missing).
    pub fn parse(packet: &[u8]) -> Result<FromStem, String> {
        let value: Value = serde_json::from_slice(packet)
            .map_err(|e| format!("a message that is not JSON ({e})"))?;
        let v = value.get("v").and_then(Value::as_u64);
        if v != Some(VERSION) {
            return Err(format!(
                "a message of protocol version {}, this master speaks {VERSION}",
                value.get("v").map_or("(none)".to_owned(), Value::to_string)
            ));
        }
        let kind = value.get("type").and_then(Value::as_str).unwrap_or("");
        let text = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| format!("a `{kind}` message without a string `{key}`"))
        };
        let id = || {
            value
                .get("id")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("a `{kind}` without `id`"))
        };
        Ok(match kind {
            "ready" => FromStem::Ready,
            "refused" => FromStem::Refused(text("error")?),
            "forked" => {
                let pid = value.get("pid").and_then(Value::as_i64);
                let pid = pid.filter(|&p| p > 1 && p <= i64::from(i32::MAX));
                let pid =
                    pid.ok_or_else(|| "a `forked` message without a valid `pid`".to_owned())?;
                FromStem::Forked { id: id()?, pid: Pid::from_raw(pid as i32) }
            }
            "fork_failed" => FromStem::ForkFailed { id: id()?, error: text("error")? },
            other => FromStem::Unknown(other.to_owned()),
        })
    }
}

/// What a drain of the channel found.
#[derive(Debug, Default)]
pub struct Received {
    pub messages: Vec<FromStem>,
    /// Why the peer is broken (a malformed message), if it is.
    pub broken: Option<String>,
    /// The stem closed its end (or died).
    pub closed: bool,
}

/// The master's end of a stem's socket pair.
pub struct Channel {
    fd: OwnedFd,
    outbox: VecDeque<Vec<u8>>,
    closed: bool,
}

impl Channel {
    /// A new socket pair: the master's end (non-blocking) and the stem's (blocking), both
    /// close-on-exec (the spawn places the stem's at its fd without the flag).
    pub fn pair() -> nix::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let flags = OFlag::from_bits_truncate(fcntl(&ours, FcntlArg::F_GETFL)?);
        fcntl(&ours, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok((Channel { fd: ours, outbox: VecDeque::new(), closed: false }, theirs))
    }

    /// Queues `packet` and sends what the socket takes now.
    pub fn send(&mut self, packet: Vec<u8>) {
        self.outbox.push_back(packet);
        self.flush();
    }

    /// Sends queued packets until the socket is full; a stem that is gone closes the channel.
    pub fn flush(&mut self) {
        while let Some(packet) = self.outbox.front() {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match socket::send(self.fd.as_raw_fd(), packet, flags) {
                Ok(_) => {
                    self.outbox.pop_front();
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.closed = true;
                    self.outbox.clear();
                    return;
                }
            }
        }
    }

    /// Whether packets wait for the socket to be writable.
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty() && !self.closed
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Reads every packet there is now.
    pub fn receive(&mut self) -> Received {
        let mut got = Received::default();
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        while !self.closed {
            match socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => {
                    self.closed = true;
                    got.closed = true;
                }
                Ok(n) if n > MAX_MESSAGE => {
                    got.broken = Some(format!("a message over {MAX_MESSAGE} bytes"));
                    return got;
                }
                Ok(n) => match FromStem::parse(&buf[..n]) {
                    Ok(m) => got.messages.push(m),
                    Err(why) => {
                        got.broken = Some(why);
                        return got;
                    }
                },
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(_) => {
                    self.closed = true;
                    got.closed = true;
                }
            }
        }
        got
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_the_whole_environment_and_is_bounded() {
        let env = vec![("A".to_owned(), "1".to_owned()), ("LISTEN_FDS".to_owned(), "2".to_owned())];
        let r = Request { id: 7, slot: 2, generation: 3, env: &env, pid_vars: &["LISTEN_PID"] };
        let v: Value = serde_json::from_slice(&r.encode().unwrap()).unwrap();
        assert_eq!(v["v"], 1);
        assert_eq!(v["type"], "fork");
        assert_eq!(
            (v["id"].as_u64(), v["slot"].as_u64(), v["generation"].as_u64()),
            (Some(7), Some(2), Some(3))
        );
        assert_eq!(v["env"]["LISTEN_FDS"], "2");
        assert_eq!(v["pid_vars"][0], "LISTEN_PID");

        let huge = vec![("BIG".to_owned(), "x".repeat(MAX_MESSAGE))];
        let r = Request { env: &huge, ..r };
        assert!(r.encode().unwrap_err().contains("at most 131072"));
    }

    #[test]
    fn messages_from_the_stem_parse_or_say_what_is_wrong() {
        let p = |s: &str| FromStem::parse(s.as_bytes());
        assert_eq!(p(r#"{"v":1,"type":"ready","pid":5}"#), Ok(FromStem::Ready));
        assert_eq!(
            p(r#"{"v":1,"type":"forked","id":3,"pid":1234}"#),
            Ok(FromStem::Forked { id: 3, pid: Pid::from_raw(1234) })
        );
        assert_eq!(
            p(r#"{"v":1,"type":"fork_failed","id":3,"error":"EAGAIN"}"#),
            Ok(FromStem::ForkFailed { id: 3, error: "EAGAIN".into() })
        );
        assert_eq!(
            p(r#"{"v":1,"type":"refused","error":"3 threads"}"#),
            Ok(FromStem::Refused("3 threads".into()))
        );
        assert_eq!(p(r#"{"v":1,"type":"hello"}"#), Ok(FromStem::Unknown("hello".into())));
        assert!(p(r#"{"v":2,"type":"ready"}"#).unwrap_err().contains("version 2"));
        assert!(p("not json").unwrap_err().contains("not JSON"));
        assert!(p(r#"{"v":1,"type":"forked","id":3,"pid":1}"#).unwrap_err().contains("pid"));
        assert!(p(r#"{"v":1,"type":"forked","pid":9}"#).unwrap_err().contains("id"));
    }

    #[test]
    fn the_channel_queues_what_a_full_socket_cannot_take_and_sees_the_peer_go() {
        let (mut ours, theirs) = Channel::pair().unwrap();
        let packet = vec![b'x'; 60_000];
        let mut sent = 0;
        while !ours.wants_write() {
            ours.send(packet.clone());
            sent += 1;
            assert!(sent < 1000, "a socket pair never filled up");
        }
        // The peer reads one: the outbox drains on the next flush.
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = socket::recv(theirs.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!(n, 60_000, "one packet per message");
        ours.flush();
        assert!(!ours.wants_write());

        socket::send(theirs.as_raw_fd(), br#"{"v":1,"type":"ready"}"#, MsgFlags::empty()).unwrap();
        socket::send(
            theirs.as_raw_fd(),
            br#"{"v":1,"type":"forked","id":1,"pid":42}"#,
            MsgFlags::empty(),
        )
        .unwrap();
        let got = ours.receive();
        assert_eq!(
            got.messages,
            vec![FromStem::Ready, FromStem::Forked { id: 1, pid: Pid::from_raw(42) }]
        );
        assert!(!got.closed);
        drop(theirs);
        assert!(ours.receive().closed);
        assert!(ours.is_closed());
    }
}
