//! `/proc/PID/stat`: the few fields presup reads of a process (its state, parent, process
//! group and start time), parsed in one place.

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
