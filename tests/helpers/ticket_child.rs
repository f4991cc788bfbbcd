//! A racing process of `tests/ticket.rs` (built as the example `ticket_child`): takes
//! `TICKET_COUNT` turns of shard `TICKET_SHARD` on the ticket file `TICKET_CHILD` through the
//! Rust API, and appends `bucket at returned` (ns of CLOCK_MONOTONIC) to `TICKET_OUT` for each.

use std::io::Write;
use std::path::Path;

use presup::ticket::{self, Ticket};

fn main() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let ticket = Ticket::open(Path::new(&var("TICKET_CHILD"))).unwrap();
    let (shard, count): (u64, u64) =
        (var("TICKET_SHARD").parse().unwrap(), var("TICKET_COUNT").parse().unwrap());
    let mut out =
        std::fs::OpenOptions::new().append(true).create(true).open(var("TICKET_OUT")).unwrap();
    for _ in 0..count {
        let g = ticket.acquire(shard);
        let returned = ticket::now();
        // One write per line, O_APPEND: lines of different processes never mix.
        out.write_all(format!("{} {} {returned}\n", g.bucket, g.at_ns()).as_bytes()).unwrap();
    }
}
