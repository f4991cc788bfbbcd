#!/usr/bin/env python3
"""Copy-on-write preload, measured. Prints figures; asserts nothing.

    python3 bench/preload.py [--mb 256] [--workers 8] [--traffic 60] [--no-gunicorn]

Total PSS (the sum of /proc/PID/smaps_rollup's Pss over the master and its workers: shared
pages are split between the processes sharing them, so the sum is the memory really used) of:

1. examples/preload.rs: the table built once by `preload` in the master, 8 forked workers;
2. the same program with --per-worker: each worker builds its own table;
3. gunicorn --preload with 8 sync workers and bench/preload_app.py (an array('Q') of the same
   size, built at import),

each right after start and after --traffic seconds of random lookups (wrk with a Lua script).
Needs wrk (Debian package) and gunicorn (pip); everything runs on 127.0.0.1 and is stopped
at the end.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "target", "release", "examples", "preload")
LUA = """
math.randomseed(os.time())
local n = tonumber(os.getenv("ENTRIES"))
request = function()
  return wrk.format("GET", "/lookup/" .. math.random(0, n - 1))
end
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /lookup/1 HTTP/1.0\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1")
    except OSError:
        return False


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def pss_kib(pid):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def total_pss_mib(master, workers):
    # The master's children: its workers and its watcher (one more process of presup's).
    pids = [master] + children(master)
    if len(pids) not in (workers + 1, workers + 2):
        print(f"  (warning: {len(pids) - 1} children, expected {workers})", file=sys.stderr)
    return sum(pss_kib(p) for p in pids) / 1024


def wait_workers(master, port, workers, timeout=600):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(children(master)) >= workers and answers(port):
            # Let the last workers finish building (per-worker mode) and settle.
            time.sleep(2)
            return
        time.sleep(0.2)
    raise SystemExit("the workers did not come up")


def traffic(port, seconds, entries, lua):
    if seconds <= 0:
        return "no traffic"
    out = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{seconds}s", "-s", lua, f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, env={**os.environ, "ENTRIES": str(entries)}, check=True,
    ).stdout
    rps = next((l.split()[1] for l in out.splitlines() if l.startswith("Requests/sec")), "?")
    return f"{rps} requests/s"


def measure(name, argv, port, workers, seconds, entries, lua, cwd, env=None):
    proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                            start_new_session=True)
    try:
        began = time.monotonic()
        wait_workers(proc.pid, port, workers)
        up = time.monotonic() - began - 2
        before = total_pss_mib(proc.pid, workers)
        load = traffic(port, seconds, entries, lua)
        after = total_pss_mib(proc.pid, workers)
        return {"name": name, "up": up, "before": before, "after": after, "load": load}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--traffic", type=int, default=60, help="seconds of load per run")
    ap.add_argument("--no-gunicorn", action="store_true")
    args = ap.parse_args()
    if args.traffic > 0 and not shutil.which("wrk"):
        raise SystemExit("wrk is missing: apt-get install wrk (or --traffic 0)")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "preload"], cwd=ROOT, check=True)
    entries = (args.mb << 20) // 8
    tmp = tempfile.mkdtemp(prefix="presup-bench-preload-")
    lua = os.path.join(tmp, "lookup.lua")
    with open(lua, "w") as f:
        f.write(LUA)
    results = []
    for name, extra in [("presup preload", []), ("presup per-worker", ["--per-worker"])]:
        port = free_port()
        cfg = os.path.join(tmp, f"{port}.toml")
        with open(cfg, "w") as f:
            f.write(f'graceful_timeout = "5s"\n[[listen]]\nname = "http"\naddress = "127.0.0.1:{port}"\n'
                    f'[workers]\ncount = {args.workers}\nready = "notify"\nboot_timeout = "600s"\n')
        argv = [EXAMPLE, "-c", cfg, "--mb", str(args.mb), "--log-level", "warn", *extra]
        results.append(measure(name, argv, port, args.workers, args.traffic, entries, lua, tmp))
    if not args.no_gunicorn:
        gunicorn = shutil.which("gunicorn")
        if gunicorn is None:
            print("gunicorn is missing: python3 -m pip install gunicorn (or --no-gunicorn)", file=sys.stderr)
        else:
            port = free_port()
            argv = [gunicorn, "--preload", "-w", str(args.workers), "-b", f"127.0.0.1:{port}",
                    "--chdir", os.path.join(ROOT, "bench"), "preload_app:app"]
            results.append(measure("gunicorn --preload", argv, port, args.workers, args.traffic,
                                   entries, lua, tmp, env={"PRELOAD_MB": str(args.mb)}))
    shutil.rmtree(tmp, ignore_errors=True)
    table = args.mb
    print(f"\ntable {table} MiB, {args.workers} workers, {args.traffic} s of random lookups per run")
    print(f"{'':22} {'up in':>8} {'PSS at start':>14} {'after load':>12} {'÷ table':>8}  load")
    for r in results:
        print(f"{r['name']:22} {r['up']:7.1f}s {r['before']:11.0f} MiB {r['after']:8.0f} MiB "
              f"{r['after'] / table:7.2f}×  {r['load']}")


if __name__ == "__main__":
    main()
