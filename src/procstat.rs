//! What presup reads of a process in `/proc`, parsed in one place: `/proc/PID/stat` (its state,
//! parent, process group and start time) and `/proc/PID/smaps_rollup` (its RSS and PSS, for
//! `presup status` and the metrics server; never read by the master).

/// A process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `Z` (a zombie), `X` (dead)...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// Clock ticks after boot: with the pid, it names one process for ever.
    pub start_time: u64,
}

impl Stat {
    /// The stat of `pid`, `None` if it is gone (or there is no `/proc`).
    pub fn read(pid: i32) -> Option<Stat> {
        Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// The fields after the command name, which is in parentheses and may hold anything.
    pub fn parse(text: &str) -> Option<Stat> {
        let fields: Vec<&str> = text.rsplit(')').next()?.split_whitespace().collect();
        Some(Stat {
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start_time: fields.get(19)?.parse().ok()?,
        })
    }

    /// A zombie or a dead process: it runs no more, whatever its pid still names.
    pub fn gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// A process's memory, from `/proc/PID/smaps_rollup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size, bytes.
    pub rss: u64,
    /// Proportional set size, bytes: shared pages divided among their sharers.
    pub pss: u64,
}

impl Memory {
    /// `None` if `pid` is gone or not ours to read.
    pub fn read(pid: i32) -> Option<Memory> {
        Memory::parse(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
    }

    pub fn parse(text: &str) -> Option<Memory> {
        Some(Memory { rss: kb_line(text, "Rss:")?, pss: kb_line(text, "Pss:")? })
    }
}

/// The bytes of a `Key:   N kB` line of a `/proc` file.
pub fn kb_line(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let mut words = line[key.len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(n * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_skipped() {
        let text = "42 (a (b) c) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 1 2 3";
        let s = Stat::parse(text).unwrap();
        assert_eq!((s.state, s.ppid, s.pgrp, s.start_time), ('S', 7, 42, 12345));
        assert!(!s.gone());
        assert!(Stat::parse("42 (x) Z 1 42").is_none(), "too short");
        assert_eq!(Stat::read(std::process::id() as i32).map(|s| s.gone()), Some(false));
    }
}
