//! The checks that compare values with each other or with the system: duplicate listener
//! names and addresses, duplicate singleton names, ticket addresses already taken, ticket names
//! that collide once upper-cased, and users and groups that do not exist.
//!
//! They run on the [`Config`] the schema walker built, whatever else was wrong, and name each
//! problem by its key path; the walker turns that into a line and column.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::Hash;

use nix::unistd::{Group, User};

use super::{Address, Config};

/// The key path (`listen[2]`) of each element of [`Config::listen`] and [`Config::singleton`]:
/// elements with errors are left out of the config, so the i-th is not always `listen[i]`.
pub(super) struct Origins {
    pub listen: Vec<String>,
    pub singleton: Vec<String>,
}

/// One problem: the key path of the offending value and what is wrong with it.
pub(super) struct Problem {
    pub key: String,
    pub message: String,
}

/// Every cross-value problem of `config`.
pub(super) fn check(config: &Config, origins: &Origins) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut addresses = HashMap::new();
    check_listeners(config, origins, &mut addresses, &mut problems);
    check_singletons(config, origins, &mut problems);
    check_tickets(config, &mut addresses, &mut problems);
    check_accounts(config, &mut problems);
    check_program(&config.workers.command, config, "workers.command", &mut problems);
    for (singleton, at) in config.singleton.iter().zip(&origins.singleton) {
        check_program(&singleton.command, config, &format!("{at}.command"), &mut problems);
    }
    problems
}

/// A program given by path (it holds a `/`) that exists must be an executable file: a
/// directory or a file without any execute bit would fail every spawn. One that does not
/// exist yet is left to the spawn (a hook may build it).
fn check_program(command: &[String], config: &Config, key: &str, problems: &mut Vec<Problem>) {
    use std::os::unix::fs::PermissionsExt;
    let Some(program) = command.first().filter(|p| p.contains('/')) else { return };
    let path = config.directory.join(program);
    let Ok(meta) = std::fs::metadata(&path) else { return };
    let message = if meta.is_dir() {
        format!("{program:?} is a directory, not a program")
    } else if meta.permissions().mode() & 0o111 == 0 {
        format!("{program:?} is not executable (chmod +x {program})")
    } else {
        return;
    };
    problems.push(Problem { key: key.to_owned(), message });
}

/// Who first used each address, by key path.
type Owners = HashMap<Address, String>;

/// Listener names and addresses are unique; each address is recorded in `addresses`.
fn check_listeners(
    config: &Config,
    origins: &Origins,
    addresses: &mut Owners,
    problems: &mut Vec<Problem>,
) {
    let mut names = HashMap::new();
    for (listen, at) in config.listen.iter().zip(&origins.listen) {
        if let Some(first) = seen_before(&mut names, &listen.name, at) {
            let message = format!("listener name {:?} is already used by {first}", listen.name);
            problems.push(Problem { key: format!("{at}.name"), message });
        }
        if let Some(first) = seen_before_address(addresses, &listen.address, at) {
            let message = format!("address {} is already used by {first}", listen.address);
            problems.push(Problem { key: format!("{at}.address"), message });
        }
    }
}

fn check_singletons(config: &Config, origins: &Origins, problems: &mut Vec<Problem>) {
    let mut names = HashMap::new();
    for (singleton, at) in config.singleton.iter().zip(&origins.singleton) {
        if let Some(first) = seen_before(&mut names, &singleton.name, at) {
            let message = format!("singleton name {:?} is already used by {first}", singleton.name);
            problems.push(Problem { key: format!("{at}.name"), message });
        }
    }
}

/// A ticket's `http` address is neither a listener's nor another ticket's, and no two ticket
/// names give the same `PRESUP_TICKET_<NAME>`.
fn check_tickets(config: &Config, addresses: &mut Owners, problems: &mut Vec<Problem>) {
    let mut env_names = HashMap::new();
    for (name, ticket) in &config.tickets {
        let at = format!("tickets.{name}");
        let env = format!("PRESUP_TICKET_{}", name.to_ascii_uppercase());
        if let Some(first) = seen_before(&mut env_names, env.clone(), &at) {
            let message = format!("ticket {first} and {at} both become {env}");
            problems.push(Problem { key: at.clone(), message });
        }
        let Some(http) = ticket.http else { continue };
        if let Some(first) = seen_before_address(addresses, &Address::Tcp(http), &at) {
            let message = format!("address {http} is already used by {first}");
            problems.push(Problem { key: format!("{at}.http"), message });
        }
    }
}
/// `user` and `group` exist on this system.
fn check_accounts(config: &Config, problems: &mut Vec<Problem>) {
    if let Some(name) = &config.user {
        let found = User::from_name(name).map(|u| u.is_some());
        account_problem("user", name, found, problems);
    }
    if let Some(name) = &config.group {
        let found = Group::from_name(name).map(|g| g.is_some());
        account_problem("group", name, found, problems);
    }
}

fn account_problem(key: &str, name: &str, found: nix::Result<bool>, problems: &mut Vec<Problem>) {
    let message = match found {
        Ok(true) => return,
        Ok(false) => format!("no such {key} {name:?}"),
        Err(e) => format!("cannot look up {key} {name:?}: {e}"),
    };
    problems.push(Problem { key: key.to_owned(), message });
}

/// As [`seen_before`] for an address; port 0 (any free port) never collides.
fn seen_before_address(seen: &mut Owners, address: &Address, at: &str) -> Option<String> {
    match address {
        Address::Tcp(a) if a.port() == 0 => None,
        _ => seen_before(seen, address.clone(), at),
    }
}

/// Records `value` as first seen at key path `at`, or returns where it was first seen.
fn seen_before<T: Eq + Hash>(seen: &mut HashMap<T, String>, value: T, at: &str) -> Option<String> {
    match seen.entry(value) {
        Entry::Occupied(first) => Some(first.get().clone()),
        Entry::Vacant(slot) => {
            slot.insert(at.to_owned());
            None
        }
    }
}
