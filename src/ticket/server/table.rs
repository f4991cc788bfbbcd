//! The ticket server's connections: which it holds, which of them are idle, and what a new
//! connection may displace.
//!
//! A connection is *idle* while it has no complete request: just accepted, between two
//! requests of a kept-alive client, or with a request head still arriving. It is *busy* once
//! its request is in, while it waits for its turn (minutes, it may be) and is answered; a busy
//! connection is never closed to make room. When there is no room, the connection idle the
//! longest is closed for the new one, so that a crowd of idle connections cannot lock out a
//! client who has something to ask; only when every connection is busy is a new one refused.
//!
//! Room is counted in the table ([`Table::capacity`], bounded by the fd limit), and idle
//! connections per remote address ([`PER_ADDRESS`]): a host with that many idle connections
//! that opens another loses its own idle longest, not another host's. Only idle connections
//! count there, so no request is ever refused for its address: a remote host whose shards all
//! wait for their turns at once (hundreds, on a large bot) is bounded by the table only.
//! Loopback peers (127.0.0.0/8, ::1) have no per-address count: every process of the host
//! comes from that one address, and closing a local bot's pooled connections whenever it opens
//! a new one would only make it reconnect.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Instant;

/// At most this many idle connections from one non-loopback address (a client's pool keeps
/// about one per shard that asked lately).
pub const PER_ADDRESS: usize = 256;

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Accept,
    /// Close connection `id` (idle), then accept.
    Evict(u64),
    /// No room, and nothing idle to close: answer 503.
    Refuse,
    /// No room until a connection being closed is gone (its fd is still open): ask again then.
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle {
        since: Instant,
    },
    Busy,
    /// Closed to make room; its thread has not ended yet, so its fd is still open.
    Closing,
}

struct Entry<S> {
    peer: IpAddr,
    state: State,
    stream: S,
}

/// The connections, each with its stream `S` (what is needed to close it).
pub struct Table<S> {
    entries: BTreeMap<u64, Entry<S>>,
    next: u64,
    capacity: usize,
    per_address: usize,
}

impl<S> Table<S> {
    pub fn new(capacity: usize, per_address: usize) -> Table<S> {
        Table { entries: BTreeMap::new(), next: 0, capacity: capacity.max(1), per_address }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// What a new connection from `peer` may have. Connections being closed count until their
    /// thread has ended, so that the fds in use stay within the table's capacity (plus one).
    pub fn admit(&self, peer: IpAddr) -> Admit {
        let peer = peer.to_canonical();
        let full = self.entries.len() >= self.capacity;
        if full && self.entries.values().any(|e| e.state == State::Closing) {
            return Admit::Wait;
        }
        if !peer.is_loopback() {
            let idle = |e: &Entry<S>| matches!(e.state, State::Idle { .. });
            let mine = self.entries.iter().filter(|(_, e)| e.peer == peer && idle(e));
            if mine.clone().count() >= self.per_address {
                return oldest_idle(mine).map_or(Admit::Refuse, Admit::Evict);
            }
        }
        if full {
            return oldest_idle(self.entries.iter()).map_or(Admit::Refuse, Admit::Evict);
        }
        Admit::Accept
    }

    /// Adds a new (idle) connection; returns its id.
    pub fn insert(&mut self, peer: IpAddr, stream: S, now: Instant) -> u64 {
        let id = self.next;
        self.next += 1;
        let entry = Entry { peer: peer.to_canonical(), state: State::Idle { since: now }, stream };
        self.entries.insert(id, entry);
        id
    }

    /// Marks connection `id` as being closed to make room; returns its stream, to shut it down.
    pub fn evict(&mut self, id: u64) -> Option<&S> {
        let e = self.entries.get_mut(&id)?;
        e.state = State::Closing;
        Some(&e.stream)
    }

    /// Takes connection `id` out: its thread has ended.
    pub fn remove(&mut self, id: u64) -> Option<S> {
        self.entries.remove(&id).map(|e| e.stream)
    }

    /// Connection `id` has a request (`idle_since: None`) or is done with it (`Some(now)`).
    /// False if it is being closed to make room (its thread should end).
    pub fn set(&mut self, id: u64, idle_since: Option<Instant>) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) if e.state != State::Closing => {
                e.state = idle_since.map_or(State::Busy, |since| State::Idle { since });
                true
            }
            _ => false,
        }
    }
}

fn oldest_idle<'a, S: 'a>(entries: impl Iterator<Item = (&'a u64, &'a Entry<S>)>) -> Option<u64> {
    let idle = entries.filter_map(|(&id, e)| match e.state {
        State::Idle { since } => Some((since, id)),
        _ => None,
    });
    idle.min().map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_full_table_closes_its_longest_idle_connection_and_refuses_only_when_all_are_busy() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut t = Table::new(3, 2);
        let a = t.insert(ip("127.0.0.1"), (), at(0));
        let b = t.insert(ip("127.0.0.1"), (), at(1));
        assert_eq!(t.admit(ip("127.0.0.1")), Admit::Accept);
        let c = t.insert(ip("127.0.0.1"), (), at(2));
        // Full: the one idle the longest goes first, whatever its age as a connection.
        assert_eq!(t.admit(ip("127.0.0.1")), Admit::Evict(a));
        assert!(t.set(a, None) && t.set(b, Some(at(5))));
        assert_eq!(t.admit(ip("10.0.0.1")), Admit::Evict(c));
        // Until the closed connection's thread has ended (and its fd is closed), no more room.
        assert!(t.evict(c).is_some());
        let d = t.insert(ip("10.0.0.1"), (), at(6));
        assert_eq!(t.admit(ip("127.0.0.1")), Admit::Wait);
        // Its thread finds it closing and ends.
        assert!(!t.set(c, None));
        assert!(t.remove(c).is_some());
        // Every connection waiting for its turn: refused.
        assert!(t.set(b, None) && t.set(d, None));
        assert_eq!(t.admit(ip("127.0.0.1")), Admit::Refuse);
        assert!(t.remove(a).is_some());
        assert_eq!(t.admit(ip("127.0.0.1")), Admit::Accept);
        assert!(!t.set(a, Some(at(9))));
    }

    #[test]
    fn one_remote_address_holds_at_most_its_share_of_idle_connections_loopback_no_share() {
        let t0 = Instant::now();
        let mut t = Table::new(100, 2);
        let x1 = t.insert(ip("192.0.2.7"), (), t0);
        let x2 = t.insert(ip("::ffff:192.0.2.7"), (), t0 + Duration::from_secs(1));
        // The address's own longest idle connection makes room, not another host's.
        t.insert(ip("192.0.2.8"), (), t0 - Duration::from_secs(60));
        assert_eq!(t.admit(ip("192.0.2.7")), Admit::Evict(x1));
        // Requests waiting for their turns do not count: no request is refused for its address.
        assert!(t.set(x1, None) && t.set(x2, None));
        for _ in 0..5 {
            assert_eq!(t.admit(ip("192.0.2.7")), Admit::Accept);
            let id = t.insert(ip("192.0.2.7"), (), t0);
            assert!(t.set(id, None));
        }
        assert_eq!(t.admit(ip("192.0.2.9")), Admit::Accept);
        for _ in 0..10 {
            t.insert(ip("127.0.0.1"), (), t0);
            t.insert(ip("::1"), (), t0);
        }
        assert_eq!(t.admit(ip("127.0.0.1")), Admit::Accept);
        assert_eq!(t.admit(ip("::ffff:127.0.0.1")), Admit::Accept);
        assert_eq!(t.len(), 28);
    }
}
