"""A sharded Discord bot's worker, for the sharded-bot example (seed 002).

presup runs 4 of these; the worker in slot PRESUP_WORKER_ID owns shards
[id * n, (id + 1) * n) of SHARD_COUNT, n = SHARD_COUNT / PRESUP_WORKER_COUNT, and runs each
in a thread: take the IDENTIFY ticket, connect to the gateway, IDENTIFY, and keep the session
until it closes (then identify again). Discord allows one IDENTIFY per 5 s per bucket, across
every process of the bot: the ticket is that shared queue.

The ticket is taken two ways, to show that they share one queue: workers with an even id run
`presup ticket identify --shard N` (the CLI, found through PRESUP_TICKET_IDENTIFY; Python's
subprocess closes inherited fds, and it still works), the others ask presup's ticket server
over HTTP, as a bot written for twilight's gateway-queue does (`GET $TICKET_URL/?shard=N`).
BOT_NO_TICKET=1 skips the ticket, to see the gateway refuse what that does.
"""

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

WORKER = int(os.environ.get("PRESUP_WORKER_ID", "0"))
WORKERS = int(os.environ.get("PRESUP_WORKER_COUNT", "1"))
SHARDS = int(os.environ.get("SHARD_COUNT", "8"))
HOST, PORT = os.environ.get("GATEWAY", "127.0.0.1:8090").rsplit(":", 1)
PRESUP = os.environ.get("PRESUP", "presup")  # the presup binary, if not on PATH


def ticket(shard):
    """Blocks until this shard may IDENTIFY."""
    if os.environ.get("BOT_NO_TICKET") == "1":
        return
    if path := os.environ.get("EXAMPLE_EVENTS"):  # the integration test kills us while we wait
        with open(path, "a") as f:
            f.write(f"waiting {shard} {os.getpid()}\n")
    if WORKER % 2 == 0:
        subprocess.run([PRESUP, "ticket", "identify", "--shard", str(shard)], check=True)
    else:
        url = f"{os.environ['TICKET_URL']}/?shard={shard}"
        with urllib.request.urlopen(url, timeout=3600) as answer:
            answer.read()  # {"message": "You're free to connect now! :)"}


def run_shard(shard):
    while True:
        ticket(shard)
        try:
            with socket.create_connection((HOST, int(PORT))) as conn:
                conn.sendall(f"IDENTIFY {shard} {SHARDS}\n".encode())
                reply = conn.makefile().readline().strip()
                if reply.startswith("READY"):
                    print(f"shard {shard} (worker {WORKER}): {reply}", flush=True)
                    conn.recv(1)  # the session, until the gateway closes it
                else:
                    print(f"shard {shard} (worker {WORKER}): {reply or 'closed'}", flush=True)
        except OSError as e:
            print(f"shard {shard}: gateway: {e}", flush=True)
            time.sleep(1)


def main():
    # USR1 is for log reopening; this bot logs to stdout, which presup keeps.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if os.environ.get("EXAMPLE_PIDS"):
        with open(os.environ["EXAMPLE_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\n")
    per_worker = SHARDS // WORKERS
    mine = range(WORKER * per_worker, (WORKER + 1) * per_worker)
    threads = [threading.Thread(target=run_shard, args=(s,), daemon=True) for s in mine]
    for t in threads:
        t.start()
    while True:
        signal.pause()  # presup's TERM ends the worker (and its `presup ticket` children)


if __name__ == "__main__":
    main()
