//! What the metrics server reads of other processes in `/proc`: a child's memory
//! (`smaps_rollup`) and the master's `process_*` figures. The master never reads `/proc` for a
//! scrape; its STATUS names the pids.

use std::fs;

use crate::procstat::kb_line;
pub use crate::procstat::Memory;

/// The standard `process_*` figures of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Process {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    /// Seconds since the epoch.
    pub start_time: f64,
    /// `None` when `/proc/PID/fd` is not ours to read.
    pub open_fds: Option<u64>,
    /// The soft limit; `None` when unlimited or unreadable.
    pub max_fds: Option<u64>,
}

impl Process {
    /// `None` if `pid` is gone or not ours to read.
    pub fn read(pid: i32) -> Option<Process> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let (cpu_ticks, start_ticks) = stat_ticks(&stat)?;
        let hz = clock_ticks() as f64;
        let open_fds = fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count() as u64);
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok();
        Some(Process {
            cpu_seconds: cpu_ticks as f64 / hz,
            resident_bytes: kb_line(&status, "VmRSS:")?,
            virtual_bytes: kb_line(&status, "VmSize:")?,
            start_time: boot_time()? as f64 + start_ticks as f64 / hz,
            open_fds,
            max_fds: limits.as_deref().and_then(max_open_files),
        })
    }
}

/// `utime + stime` and `starttime` of `/proc/PID/stat`, in clock ticks. The fields are counted
/// after the command name, which is in parentheses and may hold anything.
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // fields[0] is field 3 (state): utime is field 14, stime 15, starttime 22.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

/// The soft limit of "Max open files" in `/proc/PID/limits`.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// The boot time, seconds since the epoch (`btime` of `/proc/stat`).
fn boot_time() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// The clock ticks per second of `/proc`'s times: `AT_CLKTCK` of the auxiliary vector (what
/// `sysconf(_SC_CLK_TCK)` returns), else Linux's `USER_HZ` of 100.
fn clock_ticks() -> u64 {
    const AT_CLKTCK: u64 = 17;
    let word = std::mem::size_of::<usize>();
    let auxv = fs::read("/proc/self/auxv").unwrap_or_default();
    let words: Vec<u64> = auxv
        .chunks_exact(word)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..word].copy_from_slice(c);
            u64::from_ne_bytes(b)
        })
        .collect();
    let found = words.chunks_exact(2).find(|kv| kv[0] == AT_CLKTCK).map(|kv| kv[1]);
    found.filter(|&hz| hz > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup_and_the_master_files() {
        let rollup = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  2048 kB\nPss:   1000 kB\nPss_Anon: 12 kB\n";
        assert_eq!(Memory::parse(rollup), Some(Memory { rss: 2048 * 1024, pss: 1000 * 1024 }));
        assert_eq!(Memory::parse("Rss: 12 kB\n"), None, "no Pss");
        assert_eq!(Memory::parse("Rss: 12 MB\nPss: 1 kB\n"), None, "not kB");
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 1 0 12345 1 2 3";
        assert_eq!(stat_ticks(stat), Some((300, 12345)));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(max_open_files("Max open files  unlimited  unlimited files\n"), None);
    }

    /// This test's own process, read as the metrics server reads the master.
    #[test]
    fn reads_this_process() {
        let pid = std::process::id() as i32;
        let m = Memory::read(pid).expect("own smaps_rollup");
        assert!(m.rss > 0 && m.pss > 0 && m.pss <= m.rss, "{m:?}");
        let status = fs::read_to_string("/proc/self/status").unwrap();
        assert!(kb_line(&status, "VmRSS:").unwrap() > 0);

        // A file held open shows in the count.
        let before = Process::read(pid).expect("own /proc");
        let held: Vec<fs::File> = (0..8).map(|_| fs::File::open("/dev/null").unwrap()).collect();
        let during = Process::read(pid).unwrap();
        drop(held);
        let (b, d) = (before.open_fds.unwrap(), during.open_fds.unwrap());
        // nextest runs each test in a process of its own: nothing else opens or closes fds.
        assert!(d >= b + 8, "{b} then {d}");
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(during.max_fds, Some(soft));
        assert!(during.resident_bytes > 0 && during.virtual_bytes >= during.resident_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started at most an hour ago, not in the future (with a tick's rounding).
        assert!(during.start_time <= now + 1.0 && during.start_time > now - 3600.0, "{during:?}");
        assert!(during.cpu_seconds >= 0.0);
        assert_eq!(clock_ticks(), 100, "USER_HZ on Linux");
        assert_eq!(Memory::read(i32::MAX), None);
        assert_eq!(Process::read(i32::MAX), None);
    }
}
