//! A bot's shards in a presup worker, identifying through presup's ticket as twilight's gateway
//! queue (`presup::ticket::twilight::Queue`, feature `twilight-0.18`). Each worker runs
//! `SHARDS_PER_WORKER` shards (default 4): worker `slot` has shards `slot * N .. slot * N + N`,
//! each waiting for its IDENTIFY turn through `twilight_gateway_queue::Queue::enqueue`, as
//! twilight's `Shard` does. Where a real bot would send IDENTIFY, this one appends
//! `granted SHARD PID NS` (ns of CLOCK_MONOTONIC) to `$TWILIGHT_EVENTS`, then idles.
//!
//! ```toml
//! [tickets.identify]
//! interval = "5s"      # Discord: one IDENTIFY per 5 s per bucket
//! buckets = 16         # max_concurrency
//!
//! [workers]
//! command = ["target/debug/examples/twilight_shards"]
//! count = 4
//! ```

use std::io::Write;

use twilight_gateway_queue_018::Queue as _;

fn record(line: &str) {
    let Some(path) = std::env::var_os("TWILIGHT_EVENTS") else { return };
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    // One write per line, O_APPEND: lines of different processes never mix.
    f.write_all(format!("{line}\n").as_bytes()).unwrap();
}

fn main() {
    let var = |name: &str, default: u32| {
        std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    };
    let (slot, per) = (var("PRESUP_WORKER_ID", 0), var("SHARDS_PER_WORKER", 4));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
    runtime.block_on(async {
        let queue = presup::ticket::twilight::Queue::from_env("identify").unwrap();
        let shards: Vec<tokio::task::JoinHandle<()>> = (slot * per..slot * per + per)
            .map(|shard| {
                let queue = queue.clone();
                tokio::spawn(async move {
                    // A closed channel means "queue again" (twilight's contract).
                    while queue.enqueue(shard).await.is_err() {}
                    let (pid, ns) = (std::process::id(), presup::ticket::now());
                    record(&format!("granted {shard} {pid} {ns}"));
                })
            })
            .collect();
        record(&format!("enqueued {slot} {}", std::process::id()));
        for shard in shards {
            shard.await.unwrap();
        }
        std::future::pending::<()>().await
    });
}
