//! The master's log: `tracing` events, one line each, as text or JSON, to stderr or to a
//! file that USR1 reopens (for logrotate).
//!
//! Logging never stops the master: a line that cannot be written (stderr a pipe whose reader
//! exited, a full disk) is dropped and counted, and the next line that can be written is
//! preceded by one saying how many were lost. Nothing here panics or prints elsewhere.
//!
//! Nor does it block: stderr is written through a non-blocking file description of the
//! master's own (`/proc/self/fd/2` opened again, which for a pipe or a terminal is a new
//! description: the children's stderr, the original one, stays blocking), or, for a socket
//! (journald's stream under systemd), with `MSG_DONTWAIT` on each send. A reader that stopped
//! reading (`presup | less` paused, a stalled log shipper) costs lines, counted, never the
//! loop.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Where log lines go; clones share the destination.
#[derive(Clone)]
pub struct Sink {
    state: Arc<Mutex<State>>,
}

struct State {
    target: Target,
    /// The format of the lines, for the one saying some were lost.
    format: Format,
    /// Lines dropped since the last line written.
    lost: u64,
}

enum Target {
    Stderr(Stderr),
    File { path: PathBuf, file: File },
}

/// How the master writes to its stderr without blocking.
enum Stderr {
    /// A non-blocking description of its own, on the same pipe, terminal or file.
    Own(File),
    /// A socket: each line sent with `MSG_DONTWAIT`.
    Socket,
    /// A regular file, or neither could be had: plain writes to fd 2.
    Blocking,
}

impl Stderr {
    fn open() -> Stderr {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let fd2 = std::path::Path::new("/proc/self/fd/2");
        match std::fs::metadata(fd2).map(|m| m.file_type()) {
            Ok(t) if t.is_socket() => return Stderr::Socket,
            // A pipe or a terminal can block; a new description of it is the master's alone.
            Ok(t) if t.is_fifo() || t.is_char_device() => {}
            // A regular file never blocks for long, and its offset is shared with the children
            // (`2> log` without O_APPEND): a description of the master's own would overwrite.
            _ => return Stderr::Blocking,
        }
        let flags = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
        match OpenOptions::new().append(true).custom_flags(flags).open(fd2) {
            Ok(f) => Stderr::Own(f),
            Err(_) => Stderr::Blocking,
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stderr::Own(f) => f.write_all(buf),
            Stderr::Socket => {
                use nix::sys::socket::{send, MsgFlags};
                let fd = std::os::fd::AsRawFd::as_raw_fd(&io::stderr());
                let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
                let mut rest = buf;
                while !rest.is_empty() {
                    let n = send(fd, rest, flags).map_err(io::Error::from)?;
                    rest = &rest[n..];
                }
                Ok(())
            }
            Stderr::Blocking => io::stderr().lock().write_all(buf),
        }
    }
}

impl Sink {
    pub fn stderr() -> Sink {
        Sink::new(Target::Stderr(Stderr::open()))
    }

    pub fn file(path: &Path) -> io::Result<Sink> {
        let file = open_append(path)?;
        Ok(Sink::new(Target::File { path: path.to_path_buf(), file }))
    }

    fn new(target: Target) -> Sink {
        let state = State { target, format: Format::Text, lost: 0 };
        Sink { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reopens the log file (after rotation); a no-op for stderr. Lines lost before are
    /// reported by the next line written.
    pub fn reopen(&self) -> io::Result<()> {
        let mut state = self.lock();
        if let Target::File { path, file } = &mut state.target {
            *file = open_append(path)?;
        }
        Ok(())
    }

    /// Lines dropped since the last one written.
    pub fn lost(&self) -> u64 {
        self.lock().lost
    }
}

impl State {
    /// Writes one whole line; on failure it is counted as lost, never an error.
    fn write_line(&mut self, line: &[u8]) {
        if self.lost > 0 {
            let notice = lost_notice(self.format, self.lost, &timestamp());
            if self.target.write_all(notice.as_bytes()).is_err() {
                self.lost += 1;
                return;
            }
            self.lost = 0;
        }
        if self.target.write_all(line).is_err() {
            self.lost += 1;
        }
    }
}

impl Target {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Target::Stderr(stderr) => stderr.write_all(buf),
            Target::File { file, .. } => file.write_all(buf),
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn timestamp() -> String {
    let mut s = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut s));
    s
}

/// The line that says `n` lines were lost, in `format`, as the subscriber would write it.
fn lost_notice(format: Format, n: u64, timestamp: &str) -> String {
    let message = match n {
        1 => "1 log line could not be written and was lost".to_owned(),
        n => format!("{n} log lines could not be written and were lost"),
    };
    match format {
        Format::Text => format!("{timestamp}  WARN {message}\n"),
        Format::Json => format!(
            "{{\"timestamp\":\"{timestamp}\",\"level\":\"WARN\",\"message\":\"{message}\"}}\n"
        ),
    }
}

/// One log line being written: the subscriber formats a whole line, then writes it at once.
pub struct Line {
    sink: Sink,
}

impl Write for Line {
    /// Always succeeds: a failed write is counted by the sink, so that the subscriber never
    /// reports it (its fallback `eprintln!` would panic on the same broken stderr).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.lock().write_line(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line { sink: self.clone() }
    }
}

/// Installs the global subscriber. `level` is a `tracing` filter (`info`, `debug`,
/// `presup=debug`...).
pub fn init(level: &str, format: Format, sink: Sink) -> Result<(), InitError> {
    let filter = EnvFilter::try_new(level)
        .map_err(|source| InitError::Level { level: level.to_owned(), source })?;
    sink.lock().format = format;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_target(false)
        .with_ansi(false)
        .log_internal_errors(false);
    let result = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(InitError::Subscriber)
}

/// Why the log could not be started.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("--log-level {level}: {source}")]
    Level {
        level: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("{0}")]
    Subscriber(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Prints `message` to stderr for a user (errors before the log starts, or after it ends);
/// a stderr that cannot be written is ignored, as `eprintln!` would panic.
pub fn report(message: std::fmt::Arguments) {
    let _ = writeln!(io::stderr().lock(), "{message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lost_notice_matches_each_format() {
        let ts = "2025-01-01T00:00:00.000000Z";
        assert_eq!(
            lost_notice(Format::Text, 3, ts),
            "2025-01-01T00:00:00.000000Z  WARN 3 log lines could not be written and were lost\n"
        );
        assert_eq!(
            lost_notice(Format::Json, 1, ts),
            "{\"timestamp\":\"2025-01-01T00:00:00.000000Z\",\"level\":\"WARN\",\"message\":\
             \"1 log line could not be written and was lost\"}\n"
        );
    }

    #[test]
    fn failed_lines_are_counted_then_reported_by_the_next_written_one() {
        // /dev/full fails every write with ENOSPC.
        let sink = Sink::file(Path::new("/dev/full")).unwrap();
        let mut line = sink.make_writer();
        assert_eq!(line.write(b"one\n").unwrap(), 4);
        line.write_all(b"two\n").unwrap();
        assert_eq!(sink.lost(), 2);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        if let Target::File { path, .. } = &mut sink.lock().target {
            *path = log.clone();
        }
        sink.reopen().unwrap();
        sink.make_writer().write_all(b"three\n").unwrap();
        assert_eq!(sink.lost(), 0);
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].ends_with("WARN 2 log lines could not be written and were lost"));
        assert_eq!(lines[1], "three");
    }
}
