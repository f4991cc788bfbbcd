//! The master's log: `tracing` events, one line each, as text or JSON, to stderr or to a
//! file that USR1 reopens (for logrotate).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    target: Arc<Mutex<Target>>,
}

enum Target {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Sink {
    pub fn stderr() -> Sink {
        Sink { target: Arc::new(Mutex::new(Target::Stderr)) }
    }

    pub fn file(path: &Path) -> io::Result<Sink> {
        let file = open_append(path)?;
        Ok(Sink { target: Arc::new(Mutex::new(Target::File { path: path.to_path_buf(), file })) })
    }

    /// Reopens the log file (after rotation); a no-op for stderr.
    pub fn reopen(&self) -> io::Result<()> {
        let mut target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if let Target::File { path, file } = &mut *target {
            *file = open_append(path)?;
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// One log line being written.
pub struct Line {
    sink: Sink,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut target = self.sink.target.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *target {
            Target::Stderr => io::stderr().write(buf),
            Target::File { file, .. } => file.write(buf),
        }
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
pub fn init(level: &str, format: Format, sink: Sink) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level {level}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink)
        .with_target(false)
        .with_ansi(false);
    let result = match format {
        Format::Text => builder.try_init(),
        Format::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| e.to_string())
}
