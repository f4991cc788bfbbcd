//! Reservations: how a grant instant is chosen and recorded, on a [`Shared`] view.
//!
//! **Buckets.** Slot `b` holds the next free instant of bucket `b`. A reservation at `now`
//! takes `at = max(now, slot)` and moves the slot to `at + interval`, so grants of one bucket
//! come in the order they were reserved, each at least `interval` after the one before. (The
//! file's `interval` is the config's `interval` plus its `margin`: see `default_margin`.)
//! Without a daily limit this is one compare-and-swap: a process killed at any point either
//! reserved (its turn passes unused) or did not.
//!
//! **The daily limit** (`L` grants per period `P`) is a ring of `L` *chains*: reservation
//! number `k` goes to chain `k mod L` and must come at least `P` after that chain's last grant.
//! The grants of one chain are then at least `P` apart, so a window of length `P` holds at most
//! one grant of each chain: at most `L` grants, whatever the order in which the buckets'
//! reservations interleave. A daily reservation reads and writes three words (the bucket's
//! slot, the chain, the cursor), so it holds a lock for those few instructions.
//!
//! **The lock** word holds its holder's identity: pid and process start time (the start time
//! tells a dead holder from a new process that got its pid). A waiter that finds the holder
//! dead (gone, a zombie, or its pid reused) takes the lock over. The holder writes in an order
//! where every store only *raises* a value (the slot, then the chain, then the cursor), so a
//! holder killed between two stores leaves a state that is merely conservative: its own turn,
//! never granted, is skipped, and no later grant can come sooner than the rules allow.

use std::sync::atomic::{AtomicU64, Ordering::*};

use super::layout::{Params, Shared};

/// The instant of a reservation made at `now` in a bucket whose next free instant is `next`;
/// `chain_last` is the last grant of its chain (0: none, or no daily limit), `period` the daily
/// period.
pub fn grant_at(now: u64, next: u64, chain_last: u64, period: u64) -> u64 {
    let at = now.max(next);
    if chain_last == 0 {
        at
    } else {
        at.max(chain_last.saturating_add(period))
    }
}

/// A reserved turn: granted at `at` (ns of CLOCK_MONOTONIC); `undo` puts things back if its
/// holder gives up before `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub bucket: u32,
    pub at: u64,
    undo: Undo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undo {
    /// The slot's value before.
    Slot { before: u64 },
    /// The slot's value before, the cursor value taken and the chain's value before.
    Daily { before: u64, cursor: u64, chain_before: u64 },
}

/// Who takes the lock, and how to tell whether a holder is dead.
pub trait Holder {
    /// This process's lock word (never 0).
    fn me(&self) -> u64;
    /// Whether the process whose lock word is `word` is dead.
    fn dead(&self, word: u64) -> bool;
}

impl Shared<'_> {
    pub fn params(&self) -> Params {
        self.header.params()
    }

    /// Reserves the next free turn of `bucket`, read at `now()`, unless it comes after
    /// `deadline`: then nothing is reserved and `Err` says when it would have been.
    pub fn reserve(
        &self,
        bucket: u32,
        now: &dyn Fn() -> u64,
        deadline: Option<u64>,
        holder: &dyn Holder,
    ) -> Result<Reservation, u64> {
        let p = self.params();
        let slot = &self.slots[bucket as usize];
        if !p.daily() {
            let mut next = slot.load(Acquire);
            loop {
                let at = now().max(next);
                if deadline.is_some_and(|d| at > d) {
                    return Err(at);
                }
                match slot.compare_exchange_weak(
                    next,
                    at.saturating_add(p.interval_ns),
                    AcqRel,
                    Acquire,
                ) {
                    Ok(_) => {
                        self.header.reservations.fetch_add(1, Relaxed);
                        return Ok(Reservation { bucket, at, undo: Undo::Slot { before: next } });
                    }
                    Err(current) => next = current,
                }
            }
        }
        let _locked = self.lock(holder);
        // The clock is read once the lock is held: the wait for it is not part of the turn.
        let cursor = self.header.reservations.load(Relaxed);
        let chain = &self.ring[(cursor % p.daily_limit) as usize];
        let (next, chain_before) = (slot.load(Relaxed), chain.load(Relaxed));
        let at = grant_at(now(), next, chain_before, p.daily_period_ns);
        if deadline.is_some_and(|d| at > d) {
            return Err(at);
        }
        // Each store raises its word (at >= next, at >= chain_before + period): see the module
        // docs for why this order makes a holder killed between them harmless.
        slot.store(at.saturating_add(p.interval_ns), Relaxed);
        chain.store(at, Relaxed);
        self.header.reservations.store(cursor + 1, Relaxed);
        Ok(Reservation { bucket, at, undo: Undo::Daily { before: next, cursor, chain_before } })
    }

    /// Gives a turn back, if nothing was reserved after it in its bucket (and, daily, in the
    /// ring); otherwise it passes unused. Returns whether it was given back. The caller must
    /// not use the turn afterwards, whatever the answer.
    pub fn cancel(&self, r: &Reservation, holder: &dyn Holder) -> bool {
        let p = self.params();
        let slot = &self.slots[r.bucket as usize];
        let after = r.at.saturating_add(p.interval_ns);
        match r.undo {
            Undo::Slot { before } => slot.compare_exchange(after, before, AcqRel, Relaxed).is_ok(),
            Undo::Daily { before, cursor, chain_before } => {
                let _locked = self.lock(holder);
                let chain = &self.ring[(cursor % p.daily_limit) as usize];
                let last = slot.load(Relaxed) == after
                    && chain.load(Relaxed) == r.at
                    && self.header.reservations.load(Relaxed) == cursor + 1;
                if last {
                    // Lowering is safe here: the turn being undone is never used, so a holder
                    // killed half-way leaves values that still bound every grant made.
                    slot.store(before, Relaxed);
                    chain.store(chain_before, Relaxed);
                    self.header.reservations.store(cursor, Relaxed);
                }
                last
            }
        }
    }

    /// Takes the reservation lock, taking it over from a dead holder.
    fn lock<'a>(&'a self, holder: &dyn Holder) -> Locked<'a> {
        let (word, me) = (&self.header.lock, holder.me());
        let mut tries = 0u32;
        loop {
            let held = match word.compare_exchange_weak(0, me, Acquire, Relaxed) {
                Ok(_) => return Locked { word, me },
                Err(0) => continue,
                Err(held) => held,
            };
            tries += 1;
            if tries < 64 {
                std::hint::spin_loop();
                continue;
            }
            // The holder is off the CPU (or dead): let it run, and look at it now and then.
            // A takeover is a compare-and-swap from the dead holder's word, so that of two
            // waiters only one wins, and a lock released meanwhile is not stolen.
            if tries % 16 == 0
                && holder.dead(held)
                && word.compare_exchange(held, me, Acquire, Relaxed).is_ok()
            {
                self.header.takeovers.fetch_add(1, Relaxed);
                return Locked { word, me };
            }
            if tries < 1024 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }

    /// What the status line says, at `now`.
    pub fn status(&self, now: u64) -> Status {
        let p = self.params();
        let buckets = self.slots.iter().map(|s| s.load(Relaxed).max(now)).collect();
        let daily = p.daily().then(|| {
            let used = self
                .ring
                .iter()
                .map(|c| c.load(Relaxed))
                .filter(|&at| at != 0 && at.saturating_add(p.daily_period_ns) > now)
                .count() as u64;
            let cursor = self.header.reservations.load(Relaxed);
            let chain = self.ring[(cursor % p.daily_limit) as usize].load(Relaxed);
            Daily {
                left: p.daily_limit.saturating_sub(used),
                next: grant_at(now, 0, chain, p.daily_period_ns),
            }
        });
        Status {
            now,
            buckets,
            daily,
            reservations: self.header.reservations.load(Relaxed),
            takeovers: self.header.takeovers.load(Relaxed),
        }
    }
}

/// The lock, held until dropped.
struct Locked<'a> {
    word: &'a AtomicU64,
    me: u64,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Only a holder wrongly judged dead could find another word here; it then leaves
        // the lock to the one that took it.
        let _ = self.word.compare_exchange(self.me, 0, Release, Relaxed);
    }
}

/// A ticket's state at one instant (ns of CLOCK_MONOTONIC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub now: u64,
    /// The next free instant of each bucket (`now` when it is free now).
    pub buckets: Vec<u64>,
    pub daily: Option<Daily>,
    pub reservations: u64,
    pub takeovers: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daily {
    /// Grants still allowed in the window ending now (reserved future grants count as used).
    pub left: u64,
    /// The earliest instant the daily limit allows the next grant.
    pub next: u64,
}
