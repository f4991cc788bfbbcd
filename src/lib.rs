//! presup: a prefork process supervisor for Linux.
//!
//! One **master** process binds the listening sockets, runs the run-once **hooks**, starts the
//! **singleton** children, then starts N interchangeable **workers** and keeps them alive. The
//! words below are used with one meaning each, everywhere in this crate:
//!
//! - **master**: the supervising process; single-threaded, one `poll` loop, one reaper.
//! - **worker**: one of N interchangeable children, living in a **slot** `0..N-1`; a slot keeps
//!   its number across restarts, and slot 0 is the *primary* (`PRESUP_PRIMARY=1`).
//! - **generation**: 1 at start, +1 per accepted reload; every worker belongs to one.
//! - **singleton**: a named child with exactly one instance.
//! - **hook**: a command run to completion at a lifecycle point.
//! - **ticket**: a shared-memory rate limiter every child can reach.
//! - **listener**: a socket bound (or inherited) by the master and passed to every worker.
//!
//! Module map: [`config`] reads `supervisor.toml`; [`listener`] binds sockets; [`spawn`] is the
//! only module that forks or execs; [`signals`] turns signals into counted events;
//! [`pidfile`] holds the pidfile lock; [`directory`] makes files without following symlinks; [`notify`] is the children's `NOTIFY_SOCKET`; [`systemd`] is the master's side of
//! systemd (notifications, socket activation); [`environment`] builds what a child is given;
//! [`master`] is the loop, with the pure decisions in [`master::pool`] and [`backoff`];
//! [`watcher`] kills what a master killed with `kill -9` leaves behind; [`metrics`] serves
//! Prometheus' `/metrics` from the master's control socket; [`worker`] is what a
//! preloaded program hands the master and what its forked workers are given; [`exit`] is the
//! table of exit codes; [`cli`] runs the
//! master from the command line, [`client`] is `presup status` and the other commands of the
//! control socket, and [`prefork`] is presup as a library on top of [`cli`].
//!
//! Layers, each importing only from those before it: [`config`], [`directory`], [`systemd`],
//! [`signals`], [`spawn`], [`notify`], [`environment`], [`logs`], [`backoff`]; then
//! [`listener`], [`pidfile`], [`ticket`], [`watcher`], [`worker`], [`metrics`]; then [`master`];
//! then [`cli`] and [`client`]; then [`prefork`] and the `presup` binary.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod directory;
pub mod environment;
pub mod exit;
pub mod listener;
pub mod lockfile;
pub mod logs;
pub mod master;
pub mod metrics;
pub mod notify;
pub mod pidfile;
pub mod prefork;
pub mod procstat;
pub mod signals;
pub mod spawn;
pub mod stem;
pub mod systemd;
pub mod ticket;
pub mod watcher;
pub mod worker;
