#!/usr/bin/env python3
"""examples/axum.rs under load: failed requests during 10 HUPs, and total PSS against the
preloaded table. Prints figures; asserts nothing.

    python3 bench/axum.py [--mb 256] [--workers 4] [--hups 10]

Builds the example in release mode, runs it with N axum workers forked from a master that
preloaded a table of --mb megabytes, and drives wrk (16 connections, kept alive) against
/lookup/K for the whole run while the master gets a HUP every 1.5 s: each HUP replaces every
worker, the old ones draining on TERM (axum's with_graceful_shutdown on tokio::signal). Then
the total PSS of the master and its workers, against the table's size. Needs wrk (apt-get
install wrk); everything runs on 127.0.0.1 and is stopped at the end.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "examples", "axum")

# The lookup script and the /proc helpers are bench/preload.py's.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preload import LUA, children, free_port, pss_kib  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--hups", type=int, default=10)
    args = p.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "axum"], cwd=ROOT,
                   check=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="presup-bench-") as d:
        config = os.path.join(d, "supervisor.toml")
        with open(config, "w") as f:
            f.write(f"""graceful_timeout = "10s"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"
[workers]
count = {args.workers}
ready = "notify"
""")
        lua = os.path.join(d, "lookup.lua")
        with open(lua, "w") as f:
            f.write(LUA)
        log = open(os.path.join(d, "log"), "w+")
        master = subprocess.Popen([BIN, "-c", config, "--mb", str(args.mb)], stdout=log,
                                  stderr=log, stdin=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 300
            while "ready: all workers up" not in open(log.name).read():
                if master.poll() is not None or time.monotonic() > end:
                    raise SystemExit(open(log.name).read())
                time.sleep(0.1)
            time.sleep(1)
            pids = [master.pid] + children(master.pid)
            pss = sum(pss_kib(p) for p in pids) / 1024
            seconds = int(args.hups * 1.5 + 3)
            entries = (args.mb << 20) // 8
            wrk = subprocess.Popen(
                ["wrk", "-t2", "-c16", f"-d{seconds}s", "--timeout", "5s", "-s", lua,
                 f"http://127.0.0.1:{port}/"],
                stdout=subprocess.PIPE, text=True, env={**os.environ, "ENTRIES": str(entries)})

            def hups():
                time.sleep(1.5)
                for _ in range(args.hups):
                    master.send_signal(signal.SIGHUP)
                    time.sleep(1.5)

            t = threading.Thread(target=hups)
            t.start()
            out, _ = wrk.communicate()
            t.join()
            text = open(log.name).read()
        finally:
            master.send_signal(signal.SIGTERM)
            master.wait(timeout=60)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)
    reloads = text.count("reload done")
    print(f"\naxum in {args.workers} preload workers, a {args.mb} MiB table, wrk -c16 for {seconds} s, "
          f"{args.hups} HUPs ({reloads} reloads done)\n")
    print("| figure | value |")
    print("| --- | --- |")
    print(f"| requests | {total} ({rps}/s) |")
    print(f"| failed (non-2xx, socket errors) | {failed}{' (' + errors.group(0) + ')' if errors else ''} |")
    print(f"| total PSS, master + workers | {pss:.0f} MiB ({pss / args.mb:.2f}x the table) |")
    print(f"| workers that did not catch TERM | {text.count('killed by SIGTERM')} |")


if __name__ == "__main__":
    sys.exit(main())
