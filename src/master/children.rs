//! Starting the master's three kinds of child (workers, singletons, hooks) with what each is
//! given (the [`Inheritance`]: the environment, presup's own variables, the privileges to drop
//! to, the cgroup; plus each kind's own variables, listeners and working directory), and looking at the children from outside: readiness probes and the
//! list of the master's live children.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use nix::unistd::Pid;

use crate::config::{self, Config, Hook, Ready};
use crate::environment::{Environment, WorkerVars};
use crate::listener::Listener;
use crate::master::hooks::Point;
use crate::procstat::Stat;
use crate::spawn::{self, Command, Credentials, Setup, SpawnError};
use crate::worker::{Context, WorkerFn};

/// Which worker: its slot, the slot count and its generation.
#[derive(Debug, Clone, Copy)]
pub struct At {
    pub slot: usize,
    pub count: usize,
    pub generation: u64,
}

/// What every child inherits from the master: the master's environment less systemd's variables, presup's own
/// variables (`NOTIFY_SOCKET`, `PRESUP_MASTER_PID`, `PRESUP_TICKET_*`), and the privileges to
/// drop to.
pub struct Inheritance {
    pub inherited: Environment,
    pub own: Environment,
    pub credentials: Option<Credentials>,
    /// The children's cgroup's `cgroup.procs`, when the master has one.
    pub cgroup_procs: Option<RawFd>,
    /// The children's cgroup's directory, to make exec'd children in it.
    pub cgroup_dir: Option<RawFd>,
}

impl Inheritance {
    /// A child's environment: the inherited one, then the config's `env`, then presup's own
    /// variables, which the config cannot override.
    fn env(&self, config_env: &std::collections::BTreeMap<String, String>) -> Environment {
        let mut env = self.inherited.clone();
        env.extend(config_env).overlay(&self.own);
        env
    }

    fn setup(&self, config: &Config, pid_vars: Vec<&'static str>) -> Setup {
        Setup {
            pid_vars,
            umask: config.umask,
            credentials: self.credentials.clone(),
            cgroup_procs: self.cgroup_procs,
            cgroup_dir: self.cgroup_dir,
        }
    }

    /// A worker's complete environment, and the variables its spawn sets to its own pid.
    pub fn worker_env(
        &self,
        at: At,
        config: &Config,
        listeners: &[Listener],
    ) -> (Vec<(String, String)>, Vec<&'static str>) {
        let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
        let mut env = self.env(&config.workers.env);
        env.worker(&WorkerVars {
            slot: at.slot,
            count: at.count,
            generation: at.generation,
            listener_names: &names,
        });
        let mut pid_vars = Vec::new();
        if !names.is_empty() {
            pid_vars.push("LISTEN_PID");
        }
        if let Some(every) = config.workers.watchdog {
            env.set("WATCHDOG_USEC", every.as_micros());
            pid_vars.push("WATCHDOG_PID");
        }
        (env.to_vec(), pid_vars)
    }

    pub fn worker(
        &self,
        at: At,
        config: &Config,
        listeners: &[Listener],
    ) -> Result<Pid, SpawnError> {
        let (env, pid_vars) = self.worker_env(at, config, listeners);
        let setup = self.setup(config, pid_vars);
        let command = Command::prepare(&config.workers.command, &env, &config.directory, &setup)?;
        let fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        command.spawn(&fds)
    }

    /// The stem of `generation` (`preload = true`): `[workers] command` with the listeners at
    /// fds 3.. as a worker has them and its end of the stem socket right after them, named by
    /// `PRESUP_STEM_FD`; a worker's environment without the slot's own variables.
    pub fn stem(
        &self,
        generation: u64,
        count: usize,
        config: &Config,
        listeners: &[Listener],
        socket: RawFd,
    ) -> Result<Pid, SpawnError> {
        let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
        let mut env = self.env(&config.workers.env);
        env.set("PRESUP_GENERATION", generation).set("PRESUP_WORKER_COUNT", count);
        let mut pid_vars = Vec::new();
        if !names.is_empty() {
            env.set("LISTEN_FDS", names.len()).set("LISTEN_FDNAMES", names.join(":"));
            pid_vars.push("LISTEN_PID");
        }
        env.set(crate::stem::FD_VAR, 3 + names.len());
        let setup = self.setup(config, pid_vars);
        let command =
            Command::prepare(&config.workers.command, &env.to_vec(), &config.directory, &setup)?;
        let mut fds: Vec<RawFd> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        fds.push(socket);
        command.spawn(&fds)
    }

    /// A worker forked without exec from the preloaded master ([`crate::prefork`]).
    pub fn forked_worker(
        &self,
        at: At,
        config: &Config,
        listeners: &[Listener],
        worker: &WorkerFn,
        close: &[RawFd],
    ) -> Result<Pid, SpawnError> {
        let mut env = self.env(&config.workers.env);
        env.worker(&WorkerVars {
            slot: at.slot,
            count: at.count,
            generation: at.generation,
            listener_names: &[],
        });
        let watchdog = config.workers.watchdog;
        if let Some(every) = watchdog {
            env.set("WATCHDOG_USEC", every.as_micros());
        }
        let env = env.to_vec();
        let setup = self.setup(config, vec![]);
        let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
        spawn::fork_call(&config.directory, &setup, close, || {
            // The child is single-threaded: its environment becomes the worker's.
            for (key, _) in std::env::vars_os() {
                std::env::remove_var(key);
            }
            for (key, value) in &env {
                std::env::set_var(key, value);
            }
            if watchdog.is_some() {
                std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
            }
            let listeners =
                names.iter().cloned().zip(listeners.iter().map(|l| l.as_raw_fd())).collect();
            worker(Context { slot: at.slot, count: at.count, generation: at.generation, listeners })
        })
    }

    pub fn singleton(&self, spec: &config::Singleton, config: &Config) -> Result<Pid, SpawnError> {
        let mut env = self.env(&spec.env);
        env.set("PRESUP_SINGLETON", &spec.name);
        let setup = self.setup(config, vec![]);
        Command::prepare(&spec.command, &env.to_vec(), &config.directory, &setup)?.spawn(&[])
    }

    pub fn hook(
        &self,
        point: Point,
        hook: &Hook,
        extra: &[(String, String)],
        config: &Config,
    ) -> Result<Pid, SpawnError> {
        let mut env = self.env(&hook.env);
        env.set("PRESUP_HOOK", point.name());
        for (k, v) in extra {
            env.set(k.clone(), v);
        }
        let setup = self.setup(config, vec![]);
        Command::prepare(&hook.command, &env.to_vec(), &config.directory, &setup)?.spawn(&[])
    }
}

/// Whether a starting singleton's ready socket accepts a connection.
pub fn probe(ready: &Ready) -> bool {
    match ready {
        Ready::UnixSocket(path) => crate::listener::unix_accepts(path).unwrap_or(false),
        // On the loopback a connect succeeds or is refused at once; the timeout only bounds
        // the odd case of a remote address.
        Ready::Tcp(addr) => {
            std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_ok()
        }
        Ready::Spawn | Ready::Notify => false,
    }
}

/// The live children of process `pid` (zombies included until they are reaped), from every
/// one of its threads' `children` lists.
pub fn of(pid: u32) -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return scan_ppid(pid) };
    let mut kids = Vec::new();
    for task in tasks.flatten() {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(s) => {
                kids.extend(s.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw))
            }
            Err(_) => return scan_ppid(pid),
        }
    }
    kids
}

/// Whether `pid` has exited and waits to be reaped.
pub fn is_zombie(pid: Pid) -> bool {
    Stat::read(pid.as_raw()).is_some_and(|s| s.state == 'Z')
}

/// The live (not zombie) members of process group `pgid`, for the log.
pub fn group_members(pgid: Pid) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| Stat::read(pid).is_some_and(|s| s.pgrp == pgid.as_raw() && !s.gone()))
        .map(Pid::from_raw)
        .collect()
}

/// The slow way, for kernels without `/proc/PID/task/TID/children`.
fn scan_ppid(parent: u32) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| Stat::read(pid).is_some_and(|s| s.ppid as u32 == parent))
        .map(Pid::from_raw)
        .collect()
}

/// A fork that failed for want of resources (the process limit, memory, fds): it may succeed
/// a moment later, so the whole pool backs off instead of each slot counting a boot failure.
pub fn out_of_resources(e: &crate::spawn::SpawnError) -> bool {
    let crate::spawn::SpawnError::Fork(io) = e else { return false };
    matches!(io.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_children_and_probes_sockets() {
        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        let kids = of(std::process::id());
        assert!(kids.contains(&Pid::from_raw(child.id() as i32)), "{kids:?}");
        assert!(scan_ppid(std::process::id()).contains(&Pid::from_raw(child.id() as i32)));
        child.kill().unwrap();
        child.wait().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert!(!probe(&Ready::UnixSocket(path.clone())));
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(probe(&Ready::UnixSocket(path)));
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(probe(&Ready::Tcp(tcp.local_addr().unwrap())));
    }
}
