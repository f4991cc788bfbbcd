//! The reservation arithmetic at made-up instants, on plain memory laid out as a ticket.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::file::test_support::{carry_over, parse_boot_id, State};
use super::layout::{Header, Params, Shared};
use super::reserve::{grant_at, Holder, Reservation};

const S: u64 = 1_000_000_000;

/// A ticket in plain memory.
struct Mem {
    header: Header,
    slots: Vec<AtomicU64>,
    ring: Vec<AtomicU64>,
}

impl Mem {
    fn new(p: Params) -> Mem {
        let header = Header::default();
        header.init(&p, [1, 2]);
        let words = |n| (0..n).map(|_| AtomicU64::new(0)).collect();
        Mem { header, slots: words(p.buckets as usize), ring: words(p.daily_limit as usize) }
    }

    fn from_state(s: &State) -> Mem {
        let m = Mem::new(s.params);
        for (w, v) in m.slots.iter().zip(&s.slots).chain(m.ring.iter().zip(&s.ring)) {
            w.store(*v, Relaxed);
        }
        m.header.reservations.store(s.reservations, Relaxed);
        m
    }

    fn state(&self) -> State {
        let load = |w: &[AtomicU64]| w.iter().map(|w| w.load(Relaxed)).collect();
        State {
            params: self.header.params(),
            slots: load(&self.slots),
            ring: load(&self.ring),
            reservations: self.header.reservations.load(Relaxed),
        }
    }

    fn view(&self) -> Shared<'_> {
        Shared { header: &self.header, slots: &self.slots, ring: &self.ring }
    }

    fn reserve(&self, bucket: u32, now: u64) -> Reservation {
        self.view().reserve(bucket, &|| now, None, &Alive).unwrap()
    }
}

/// A holder that never finds another dead.
struct Alive;

impl Holder for Alive {
    fn me(&self) -> u64 {
        7
    }
    fn dead(&self, _: u64) -> bool {
        false
    }
}

/// A holder for which `dead_word` is dead.
struct Takeover {
    dead_word: u64,
    asked: Cell<u32>,
}

impl Holder for Takeover {
    fn me(&self) -> u64 {
        8
    }
    fn dead(&self, word: u64) -> bool {
        self.asked.set(self.asked.get() + 1);
        word == self.dead_word
    }
}

fn params(buckets: u32, interval: u64, daily_limit: u64, period: u64) -> Params {
    Params { buckets, interval_ns: interval, daily_limit, daily_period_ns: period }
}

/// A small deterministic generator (no crates for randomness).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// Checks every rule on a list of `(bucket, at)` grants: per bucket spacing, and, if `limit`,
/// at most `limit` grants in any window of `period` that holds one of `checked` (all if None).
fn check(grants: &[(u32, u64)], interval: u64, limit: u64, period: u64, checked: Option<usize>) {
    let mut by_bucket: std::collections::BTreeMap<u32, Vec<u64>> = Default::default();
    for &(b, at) in grants {
        by_bucket.entry(b).or_default().push(at);
    }
    for (b, ats) in &by_bucket {
        for w in ats.windows(2) {
            assert!(w[1] >= w[0] + interval, "bucket {b}: {} then {}", w[0], w[1]);
        }
    }
    if limit == 0 {
        return;
    }
    let mut all: Vec<(u64, bool)> =
        grants.iter().enumerate().map(|(i, &(_, at))| (at, i >= checked.unwrap_or(0))).collect();
    all.sort_unstable();
    // The fullest windows start at a grant: count grants in [start, start + period).
    for (i, &(start, _)) in all.iter().enumerate() {
        let inside = &all[i..];
        let n = inside.iter().take_while(|(at, _)| *at < start + period).count();
        let has_checked = inside[..n].iter().any(|(_, c)| *c);
        assert!(!has_checked || n as u64 <= limit, "{n} grants in [{start}, +{period})");
    }
}

#[test]
fn the_grant_is_the_latest_of_now_the_bucket_and_the_chain() {
    assert_eq!(grant_at(10, 0, 0, 100), 10);
    assert_eq!(grant_at(10, 15, 0, 100), 15);
    // A chain's last grant at 3 holds the next one of that chain until 103.
    assert_eq!(grant_at(10, 15, 3, 100), 103);
    assert_eq!(grant_at(200, 15, 3, 100), 200);
    assert_eq!(grant_at(10, u64::MAX, 0, 1), u64::MAX);
    assert_eq!(grant_at(10, 0, u64::MAX - 1, 100), u64::MAX);
}

#[test]
fn one_bucket_grants_in_reservation_order_an_interval_apart() {
    let m = Mem::new(params(2, 5 * S, 0, 0));
    assert_eq!(m.reserve(0, 100 * S).at, 100 * S);
    // Reserved right after: the next free instant of bucket 0, in reservation order.
    assert_eq!(m.reserve(0, 100 * S + 1).at, 105 * S);
    assert_eq!(m.reserve(0, 101 * S).at, 110 * S);
    // Bucket 1 is independent.
    assert_eq!(m.reserve(1, 101 * S).at, 101 * S);
    // Once bucket 0 is idle past its next free instant, a turn is granted at once.
    assert_eq!(m.reserve(0, 200 * S).at, 200 * S);
    assert_eq!(m.view().status(202 * S).buckets, vec![205 * S, 202 * S]);
    assert_eq!(m.header.reservations.load(Relaxed), 5);
}

#[test]
fn a_bucket_s_turns_are_its_interval_plus_its_margin_apart() {
    let spec = |interval: Duration, margin: Duration| crate::config::Ticket {
        interval,
        buckets: 1,
        daily_limit: None,
        daily_period: Duration::from_secs(86400),
        http: None,
        margin,
        path: None,
    };
    let ms = Duration::from_millis;
    let p = super::set::params(&spec(ms(1000), ms(50)));
    assert_eq!(p.interval_ns, 1050 * S / 1000);
    let m = Mem::new(p);
    let ats: Vec<u64> = (0..4).map(|_| m.reserve(0, 100 * S).at).collect();
    let gaps: Vec<u64> = ats.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, vec![1050 * S / 1000; 3]);
    // Two callers woken 40 ms and 0 ms late still act 1 s apart or more.
    assert!((ats[1] - ats[0]) - 40 * S / 1000 >= S);
    // A margin of 0 is the bare interval; the default is a twentieth, at most 50 ms.
    assert_eq!(super::set::params(&spec(ms(1000), ms(0))).interval_ns, S);
    assert_eq!(super::default_margin(ms(5000)), ms(50));
    assert_eq!(super::default_margin(ms(100)), ms(5));
}

#[test]
fn a_turn_after_the_deadline_is_refused_and_reserves_nothing() {
    for daily in [0, 10] {
        let m = Mem::new(params(1, 5 * S, daily, 100 * S));
        m.reserve(0, 100 * S);
        let before = m.state();
        let refused = m.view().reserve(0, &|| 101 * S, Some(104 * S), &Alive);
        assert_eq!(refused, Err(105 * S));
        assert_eq!(m.state(), before);
        let ok = m.view().reserve(0, &|| 101 * S, Some(105 * S), &Alive).unwrap();
        assert_eq!(ok.at, 105 * S);
    }
}

#[test]
fn a_cancelled_turn_is_given_back_only_if_it_is_the_last() {
    for daily in [0, 10] {
        let m = Mem::new(params(1, 5 * S, daily, 100 * S));
        let first = m.reserve(0, 100 * S);
        let second = m.reserve(0, 100 * S);
        let before_second = {
            let m2 = Mem::new(params(1, 5 * S, daily, 100 * S));
            m2.reserve(0, 100 * S);
            m2.state()
        };
        // The first is not the last reserved: it passes unused, nothing moves.
        let state = m.state();
        assert!(!m.view().cancel(&first, &Alive));
        assert_eq!(m.state(), state);
        // The second is: everything is as if it had not been reserved.
        assert!(m.view().cancel(&second, &Alive));
        let mut after = m.state();
        after.reservations = before_second.reservations.max(after.reservations);
        assert_eq!(after.slots, before_second.slots);
        assert_eq!(after.ring, before_second.ring);
        assert_eq!(m.reserve(0, 101 * S).at, 105 * S);
    }
}

#[test]
fn the_daily_limit_holds_in_every_window_and_waits_for_the_oldest_to_leave_it() {
    // 3 grants per 100 s, 2 buckets, 1 s apart per bucket.
    let m = Mem::new(params(2, S, 3, 100 * S));
    let ats: Vec<u64> = [(0, 10), (1, 10), (0, 10), (1, 10), (0, 10)]
        .iter()
        .map(|&(b, now)| m.reserve(b, now * S).at)
        .collect();
    // Three at once (two buckets, one a second later); the fourth and fifth wait until the
    // first two leave the window (in two buckets, so both at 110 s).
    assert_eq!(ats, vec![10 * S, 10 * S, 11 * S, 110 * S, 110 * S]);
    let status = m.view().status(50 * S);
    assert_eq!(status.daily.unwrap().left, 0);
    let status = m.view().status(110 * S + 1);
    // The grants of 10 s have left the window; 11 and the two of 110 are in it.
    assert_eq!(status.daily.unwrap().left, 0);
    assert_eq!(m.view().status(112 * S).daily.unwrap().left, 1);
}

#[test]
fn random_reservations_keep_every_rule() {
    let mut rng = Lcg(42);
    for round in 0..40 {
        let (buckets, interval) = (1 + rng.next(4) as u32, 1 + rng.next(20));
        let (limit, period) = (rng.next(6), 1 + rng.next(300));
        let m = Mem::new(params(buckets, interval, limit, period));
        let mut now = 1;
        let mut grants = vec![];
        for _ in 0..300 {
            now += rng.next(15);
            let r = m.reserve(rng.next(buckets as u64) as u32, now);
            assert!(r.at >= now, "round {round}");
            grants.push((r.bucket, r.at));
        }
        check(&grants, interval, limit, period, None);
    }
}

#[test]
fn a_holder_killed_between_any_two_stores_breaks_no_rule() {
    // The daily reservation stores the slot, then the chain, then the cursor. A holder killed
    // after k of them (k = 0..3) leaves the lock held by a dead process; the next holder takes
    // it over and every rule still holds for the grants actually made.
    for k in 0..3 {
        let p = params(2, 10, 3, 100);
        let m = Mem::new(p);
        let mut grants = vec![];
        let mut rng = Lcg(k);
        let mut now = 1;
        for i in 0..200 {
            now += rng.next(20);
            let bucket = rng.next(2) as u32;
            if i % 17 == 5 {
                // The dead holder's partial reservation, as `reserve` writes it.
                let cursor = m.header.reservations.load(Relaxed);
                let chain = &m.ring[(cursor % 3) as usize];
                let slot = &m.slots[bucket as usize];
                let at = grant_at(now, slot.load(Relaxed), chain.load(Relaxed), 100);
                let stores: [&dyn Fn(); 3] =
                    [&|| slot.store(at + 10, Relaxed), &|| chain.store(at, Relaxed), &|| {
                        m.header.reservations.store(cursor + 1, Relaxed)
                    }];
                stores.iter().take(k as usize).for_each(|store| store());
                m.header.lock.store(999, Relaxed);
                let holder = Takeover { dead_word: 999, asked: Cell::new(0) };
                let r = m.view().reserve(bucket, &|| now, None, &holder).unwrap();
                assert!(holder.asked.get() >= 1);
                grants.push((r.bucket, r.at));
            } else {
                grants.push((bucket, m.reserve(bucket, now).at));
            }
            assert_eq!(m.header.lock.load(Relaxed), 0, "the lock is free after a reservation");
        }
        assert_eq!(m.header.takeovers.load(Relaxed), 12);
        check(&grants, 10, 3, 100, None);
    }
}

#[test]
fn a_live_holder_is_waited_for() {
    let m = Mem::new(params(1, 10, 3, 100));
    m.header.lock.store(999, Relaxed);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| m.reserve(0, 5).at);
        // The holder is alive (`Alive` never finds it dead): the waiter waits until it lets go.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        m.header.lock.store(0, Relaxed);
        assert_eq!(waiter.join().unwrap(), 5);
    });
    assert_eq!(m.header.takeovers.load(Relaxed), 0);
}

/// Grants made under `old`, carried over to `new`, then more grants under `new`: the new
/// rules hold for every window that holds a new grant, old grants counted.
fn carry_and_check(old: Params, new: Params, seed: u64) {
    let mut rng = Lcg(seed);
    let m = Mem::new(old);
    let mut grants = vec![];
    let mut now = 1000;
    for _ in 0..rng.next(40) {
        now += rng.next(30);
        let r = m.reserve(rng.next(old.buckets as u64) as u32, now);
        grants.push((r.bucket, r.at));
    }
    let carried = carry_over(&m.state(), &new).unwrap();
    let m = Mem::from_state(&carried);
    let first_new = grants.len();
    let old_grants = grants.clone();
    for _ in 0..100 {
        now += rng.next(30);
        let r = m.reserve(rng.next(new.buckets as u64) as u32, now);
        grants.push((r.bucket, r.at));
    }
    // Bucket spacing: a new grant comes at least the new interval after any old grant of
    // its bucket (after any old grant at all when the bucket count changed).
    for &(b, at) in &grants[first_new..] {
        for &(ob, oat) in &old_grants {
            if old.buckets != new.buckets || ob == b {
                assert!(at >= oat + new.interval_ns, "seed {seed}: old {oat} then {at}");
            }
        }
    }
    check(&grants[first_new..], new.interval_ns, 0, 0, None);
    if new.daily_limit > 0 {
        check(&grants, 0, new.daily_limit, new.daily_period_ns, Some(first_new));
    }
}

#[test]
fn a_changed_ticket_carries_its_last_grants_over() {
    for seed in 0..60 {
        carry_and_check(params(2, 10, 0, 0), params(2, 25, 0, 0), seed);
        carry_and_check(params(2, 10, 0, 0), params(3, 5, 0, 0), seed);
        carry_and_check(params(2, 10, 5, 100), params(4, 10, 3, 100), seed);
        carry_and_check(params(2, 10, 3, 100), params(1, 10, 7, 80), seed);
        carry_and_check(params(1, 1, 4, 100), params(1, 1, 4, 60), seed);
        carry_and_check(params(2, 10, 4, 100), params(2, 10, 0, 0), seed);
    }
    let old = State::fresh(params(1, 10, 0, 0));
    assert!(carry_over(&old, &params(1, 10, 5, 100)).unwrap_err().contains("no record"));
    let old = State::fresh(params(1, 10, 5, 100));
    assert!(carry_over(&old, &params(1, 10, 5, 101)).unwrap_err().contains("grew"));
}

#[test]
fn boot_ids_are_read_as_two_words() {
    let id = parse_boot_id("0123456789abcdef-fedc-ba98-7654-3210aaaaaaaa\n");
    assert_eq!(id, None, "wrong length");
    let id = parse_boot_id("01234567-89ab-cdef-fedc-ba9876543210\n");
    assert_eq!(id, Some([0x0123456789abcdef, 0xfedcba9876543210]));
    assert_ne!(super::file::boot_id(), [0, 0]);
}

#[test]
fn a_lock_holder_is_dead_once_gone_a_zombie_or_its_pid_reused() {
    use super::{start_time, ThisProcess, PID_BITS};
    let me = ThisProcess.me();
    assert_eq!(me & ((1 << PID_BITS) - 1), u64::from(std::process::id()));
    assert!(!ThisProcess.dead(me));
    // The same pid with another start time: the pid was reused by another process.
    assert!(ThisProcess.dead(me + (1 << PID_BITS)));
    let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
    let pid = child.id();
    let word = (start_time(pid).unwrap() << PID_BITS) | u64::from(pid);
    assert!(!ThisProcess.dead(word));
    child.kill().unwrap();
    // Killed, not yet reaped: a zombie holds no lock.
    let zombie = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") Z ");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !zombie() {
        assert!(std::time::Instant::now() < end, "the child never became a zombie");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(ThisProcess.dead(word));
    child.wait().unwrap();
    assert!(ThisProcess.dead(word));
}

#[test]
fn a_header_announcing_absurd_sizes_is_refused_before_any_length_arithmetic() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ticket");
    drop(super::file::create(&path, &params(2, 1000, 0, 0), [1, 2]).unwrap());
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // `#[repr(C)]` header: daily_limit at byte 24, daily_period_ns at 32. 2^61 words would
    // wrap the file length in 64 bits.
    f.write_all_at(&(1u64 << 61).to_ne_bytes(), 24).unwrap();
    f.write_all_at(&1_000u64.to_ne_bytes(), 32).unwrap();
    let err = super::layout::Mapping::map(&f).err().expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("invalid sizes"), "{err}");
}
