//! A ticket as twilight's gateway queue: `presup::ticket::twilight::Queue` implements
//! `twilight_gateway_queue::Queue` (feature `twilight-0.18` for twilight 0.18, `twilight-0.17`
//! for 0.17), so that the shards of a bot spread over several presup workers share one
//! IDENTIFY queue, with no queue server:
//!
//! ```ignore
//! let queue = presup::ticket::twilight::Queue::from_env("identify")?;
//! let config = twilight_gateway::ConfigBuilder::new(token, intents).queue(queue).build();
//! ```
//!
//! `enqueue(shard)` reserves the shard's turn at once (so turns go in the order shards asked),
//! and a task sends `()` on the returned channel when the turn comes. A shard that drops its
//! receiver before then (it was closed, its process is stopping) gives its turn back: the next
//! caller of its bucket may take it. The task runs on the caller's tokio runtime (twilight's),
//! or on a thread of its own when there is none.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Reservation, Ticket, TicketError};

/// A presup ticket, as twilight's gateway queue. Cheap to clone: clones share the ticket.
#[derive(Debug, Clone)]
pub struct Queue {
    ticket: Ticket,
}

impl Queue {
    /// The queue of ticket `name` (`[tickets.NAME]` of the master's config), found through
    /// `PRESUP_TICKET_<NAME>`.
    pub fn from_env(name: &str) -> Result<Queue, TicketError> {
        Ok(Queue::new(Ticket::from_env(name)?))
    }

    pub fn new(ticket: Ticket) -> Queue {
        Queue { ticket }
    }

    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// Reserves `shard`'s turn; the receiver gets `()` when it comes.
    pub fn enqueue_shard(&self, shard: u32) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let r = self.ticket.reserve(shard.into(), None).expect("no deadline: never refused");
        let ticket = self.ticket.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(grant_async(ticket, r, tx))),
            Err(_) => drop(std::thread::spawn(move || grant_blocking(&ticket, &r, tx))),
        }
        rx
    }
}

/// Sends `()` at `r`'s turn, or gives the turn back if the receiver goes first.
async fn grant_async(ticket: Ticket, r: Reservation, mut tx: oneshot::Sender<()>) {
    let closed = tokio::select! {
        () = tokio::time::sleep_until(r.at.into()) => false,
        () = tx.closed() => true,
    };
    if closed {
        ticket.cancel(&r);
    } else {
        let _ = tx.send(());
    }
}

/// [`grant_async`] without a runtime: checks for a dropped receiver every 50 ms.
fn grant_blocking(ticket: &Ticket, r: &Reservation, tx: oneshot::Sender<()>) {
    loop {
        if tx.is_closed() {
            ticket.cancel(r);
            return;
        }
        let left = r.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
    r.wait();
    let _ = tx.send(());
}

#[cfg(feature = "twilight-0.18")]
impl twilight_gateway_queue_018::Queue for Queue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        self.enqueue_shard(shard)
    }
}

#[cfg(feature = "twilight-0.17")]
impl twilight_gateway_queue_017::Queue for Queue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        self.enqueue_shard(shard)
    }
}
