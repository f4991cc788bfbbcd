//! What a child is given in its environment (the README's "What a child gets").
//!
//! A child's environment is the master's own, less the variables systemd gave the master
//! (they describe the master, not the child), plus the config's `env`, plus presup's own
//! variables, which win over both.

use std::collections::BTreeMap;

/// Variables systemd sets for the service's main process; never passed on.
pub const SYSTEMD_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// An environment under construction; later settings win.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    vars: BTreeMap<String, String>,
}

impl Environment {
    /// The master's environment (as given) without systemd's variables.
    pub fn inherited(vars: impl IntoIterator<Item = (String, String)>) -> Environment {
        let vars = vars.into_iter().filter(|(k, _)| !SYSTEMD_VARS.contains(&k.as_str())).collect();
        Environment { vars }
    }

    pub fn set(&mut self, key: impl Into<String>, value: impl ToString) -> &mut Self {
        self.vars.insert(key.into(), value.to_string());
        self
    }

    pub fn extend(&mut self, vars: &BTreeMap<String, String>) -> &mut Self {
        for (k, v) in vars {
            self.vars.insert(k.clone(), v.clone());
        }
        self
    }

    /// Lays `other` over this environment: its variables win.
    pub fn overlay(&mut self, other: &Environment) -> &mut Self {
        self.extend(&other.vars)
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars.get(key).map(String::as_str)
    }

    pub fn to_vec(&self) -> Vec<(String, String)> {
        self.vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What a worker in `slot` of generation `generation` gets on top of the base environment.
pub struct WorkerVars<'a> {
    pub slot: usize,
    pub count: usize,
    pub generation: u64,
    /// Listener names, in fd order.
    pub listener_names: &'a [String],
}

impl Environment {
    /// Adds a worker's variables (`LISTEN_PID` is filled in by the spawn,
    /// since only the child knows its pid).
    pub fn worker(&mut self, w: &WorkerVars<'_>) -> &mut Self {
        self.set("PRESUP_WORKER_ID", w.slot)
            .set("PRESUP_WORKER_COUNT", w.count)
            .set("PRESUP_GENERATION", w.generation)
            .set("PRESUP_PRIMARY", if w.slot == 0 { "1" } else { "0" });
        if !w.listener_names.is_empty() {
            self.set("LISTEN_FDS", w.listener_names.len())
                .set("LISTEN_FDNAMES", w.listener_names.join(":"));
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_vars_never_pass_and_presup_vars_win() {
        let base = [
            ("PATH", "/bin"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("LISTEN_FDS", "2"),
            ("WATCHDOG_USEC", "1000"),
            ("PRESUP_WORKER_ID", "9"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let mut env = Environment::inherited(base);
        let mut cfg = BTreeMap::new();
        cfg.insert("APP_ENV".to_owned(), "production".to_owned());
        cfg.insert("PRESUP_PRIMARY".to_owned(), "1".to_owned());
        cfg.insert("PRESUP_MASTER_PID".to_owned(), "1".to_owned());
        env.extend(&cfg);
        // The master's own variables (as the master's Inheritance lays them), over the config's env.
        let mut own = Environment::default();
        own.set("PRESUP_MASTER_PID", 77);
        env.overlay(&own);
        let names = ["http".to_owned(), "admin".to_owned()];
        env.worker(&WorkerVars { slot: 2, count: 4, generation: 3, listener_names: &names });
        assert_eq!(env.get("NOTIFY_SOCKET"), None);
        assert_eq!(env.get("WATCHDOG_USEC"), None);
        assert_eq!(env.get("PATH"), Some("/bin"));
        assert_eq!(env.get("APP_ENV"), Some("production"));
        assert_eq!(env.get("PRESUP_WORKER_ID"), Some("2"));
        assert_eq!(env.get("PRESUP_PRIMARY"), Some("0"));
        assert_eq!(env.get("PRESUP_WORKER_COUNT"), Some("4"));
        assert_eq!(env.get("PRESUP_GENERATION"), Some("3"));
        assert_eq!(env.get("PRESUP_MASTER_PID"), Some("77"));
        assert_eq!(env.get("LISTEN_FDS"), Some("2"));
        assert_eq!(env.get("LISTEN_FDNAMES"), Some("http:admin"));
    }
}
