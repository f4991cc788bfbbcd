//! The ticket's bytes: a `#[repr(C)]` [`Header`], then one slot per bucket, then the daily
//! ring, every word an atomic. [`Mapping`] is the only code in presup that turns shared memory
//! into references; everything else sees a [`Shared`] view and touches it through atomics.
//!
//! ```text
//! offset 0    Header (128 bytes): magic, version, buckets, interval, daily limit and period,
//!             boot id, lock, reservations, takeovers
//! offset 128  slots[buckets]       next free instant of each bucket (ns of CLOCK_MONOTONIC)
//!             ring[daily_limit]    the last grant of each chain (0: none yet), daily only
//! ```
#![allow(unsafe_code)] // The ticket file's shared mapping, seen as #[repr(C)] atomics.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// `PRESUPTK`, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"PRESUPTK");
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = std::mem::size_of::<Header>();

/// The fixed start of a ticket. The sizes never change once the master wrote them; `lock`,
/// `reservations` and `takeovers` are the only header words that move afterwards.
#[repr(C)]
#[derive(Default)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub buckets: AtomicU32,
    /// The spacing of a bucket's grants: the config's `interval` plus its `margin`.
    pub interval_ns: AtomicU64,
    /// 0: no daily limit (and no ring).
    pub daily_limit: AtomicU64,
    pub daily_period_ns: AtomicU64,
    /// `/proc/sys/kernel/random/boot_id`: CLOCK_MONOTONIC instants mean nothing across boots.
    pub boot_id: [AtomicU64; 2],
    /// Daily tickets only: who holds the reservation lock (see `reserve`), 0 when free.
    pub lock: AtomicU64,
    /// Reservations made; for daily tickets, the ring's cursor.
    pub reservations: AtomicU64,
    /// Locks taken over from a holder that died holding them.
    pub takeovers: AtomicU64,
    pub spare: [AtomicU64; 6],
}

const _: () = assert!(HEADER_LEN == 128);

/// A ticket's sizes and rules, as the header holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub buckets: u32,
    /// The spacing of a bucket's grants: the config's `interval` plus its `margin`.
    pub interval_ns: u64,
    /// 0: none.
    pub daily_limit: u64,
    pub daily_period_ns: u64,
}

impl Params {
    /// Bytes of a mapping with these sizes.
    pub fn file_len(&self) -> usize {
        HEADER_LEN + 8 * (self.buckets as usize + self.daily_limit as usize)
    }

    pub fn daily(&self) -> bool {
        self.daily_limit > 0
    }
}

impl Header {
    pub fn params(&self) -> Params {
        Params {
            buckets: self.buckets.load(Relaxed),
            interval_ns: self.interval_ns.load(Relaxed),
            daily_limit: self.daily_limit.load(Relaxed),
            daily_period_ns: self.daily_period_ns.load(Relaxed),
        }
    }

    pub fn boot_id(&self) -> [u64; 2] {
        [self.boot_id[0].load(Relaxed), self.boot_id[1].load(Relaxed)]
    }

    /// Writes the sizes, then the magic with `Release`: whoever reads the magic with
    /// `Acquire` sees the rest.
    pub fn init(&self, p: &Params, boot_id: [u64; 2]) {
        self.version.store(VERSION, Relaxed);
        self.buckets.store(p.buckets, Relaxed);
        self.interval_ns.store(p.interval_ns, Relaxed);
        self.daily_limit.store(p.daily_limit, Relaxed);
        self.daily_period_ns.store(p.daily_period_ns, Relaxed);
        self.boot_id[0].store(boot_id[0], Relaxed);
        self.boot_id[1].store(boot_id[1], Relaxed);
        self.magic.store(MAGIC, std::sync::atomic::Ordering::Release);
    }
}

/// A ticket's words, wherever they live: a [`Mapping`], or plain memory in unit tests.
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    pub header: &'a Header,
    pub slots: &'a [AtomicU64],
    pub ring: &'a [AtomicU64],
}

/// A ticket file mapped shared (`MAP_SHARED`), read-write.
pub struct Mapping {
    map: memmap2::MmapMut,
    buckets: usize,
    ring: usize,
}

impl Mapping {
    /// Maps `file`, checks the header's magic and version and that the file holds what the
    /// header announces.
    pub fn map(file: &File) -> io::Result<Mapping> {
        let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
        let mut m = Mapping::map_raw(file)?;
        let h = m.header();
        if h.magic.load(std::sync::atomic::Ordering::Acquire) != MAGIC {
            return Err(bad("not a presup ticket (bad magic)".into()));
        }
        let version = h.version.load(Relaxed);
        if version != VERSION {
            return Err(bad(format!(
                "ticket format version {version}, this presup reads {VERSION}"
            )));
        }
        let p = h.params();
        // Bounded sizes first: `file_len` below must not overflow on a corrupt header.
        let too_big = p.buckets > super::MAX_BUCKETS || p.daily_limit > super::MAX_DAILY_LIMIT;
        if too_big || p.buckets == 0 || p.interval_ns == 0 || (p.daily() && p.daily_period_ns == 0)
        {
            return Err(bad(format!("invalid sizes in the header: {p:?}")));
        }
        if (m.map.len() as u64) < p.file_len() as u64 {
            return Err(bad(format!(
                "{} bytes, the header announces {}",
                m.map.len(),
                p.file_len()
            )));
        }
        (m.buckets, m.ring) = (p.buckets as usize, p.daily_limit as usize);
        Ok(m)
    }

    /// Maps a new file of `p.file_len()` zero bytes, whose words the caller then writes, the
    /// header's [`Header::init`] last.
    ///
    /// The bytes are allocated for real first (`posix_fallocate`), not only the length set: a
    /// store through the mapping into a hole the filesystem cannot fill (a full disk or tmpfs)
    /// is SIGBUS, where the allocation is a plain ENOSPC error.
    pub fn map_new(file: &File, p: &Params) -> io::Result<Mapping> {
        let len = p.file_len();
        nix::fcntl::posix_fallocate(file, 0, len as libc::off_t).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot allocate its {len} bytes: {}", e.desc().to_lowercase()),
            )
        })?;
        let mut m = Mapping::map_raw(file)?;
        (m.buckets, m.ring) = (p.buckets as usize, p.daily_limit as usize);
        Ok(m)
    }

    fn map_raw(file: &File) -> io::Result<Mapping> {
        let len = file.metadata()?.len();
        if len < HEADER_LEN as u64 {
            let why = format!("{len} bytes, shorter than a ticket's header");
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        // SAFETY: a MAP_SHARED mapping of a regular file. Other processes change its words
        // while it is mapped, which is why nothing here ever reads it as `&[u8]`: it is only
        // reached through `header`/`view`, as atomics. Truncating the file under a mapping
        // would raise SIGBUS; only the master and its children can open it (mode 0600 in a
        // 0700 directory, or at the operator's `path`), and none of them truncates it.
        let map = unsafe { memmap2::MmapOptions::new().map_mut(file)? };
        Ok(Mapping { map, buckets: 0, ring: 0 })
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is page-aligned and at least HEADER_LEN bytes long (checked in
        // `map`); `Header` is `repr(C)`, made of atomics only, so every bit pattern is a valid
        // value and concurrent changes by other processes are atomic accesses; the reference
        // lives no longer than `self`, which keeps the mapping.
        unsafe { &*self.map.as_ptr().cast::<Header>() }
    }

    pub fn view(&self) -> Shared<'_> {
        let words = self.buckets + self.ring;
        // SAFETY: `map` checked that the file holds HEADER_LEN + 8 * words bytes; the words
        // after the header are 8-byte aligned (the header is 128 bytes from a page start);
        // `AtomicU64` has the size and alignment of `u64` and every bit pattern is valid; the
        // slice lives no longer than `self`.
        let all: &[AtomicU64] = unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(HEADER_LEN).cast::<AtomicU64>(), words)
        };
        let (slots, ring) = all.split_at(self.buckets);
        Shared { header: self.header(), slots, ring }
    }
}
