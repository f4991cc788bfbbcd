#!/usr/bin/env python3
"""No request lost on reload (issue 4): HTTP load on 4 workers while 20 HUPs are sent, for
presup and for gunicorn with 4 sync workers, side by side in one run. Prints figures; asserts
nothing.

    python3 bench/reload.py [--hups 20] [--interval 1.0] [--connections 64]

Needs wrk (Debian: apt-get install wrk) and gunicorn (pip install gunicorn); it installs
neither behind your back and says what is missing. Everything runs on 127.0.0.1 and stops by
itself. presup runs examples/demo/app.py (standard library, one request at a time per worker,
like a gunicorn sync worker); gunicorn runs bench/wsgi_app.py, the same response.
bench/run includes this figure (and the same under worker SIGKILLs) with repeats.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "presup")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answers on port {port}")


def run_wrk(port, seconds, connections):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errs = dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups()))) if errors else {
        "connect": 0, "read": 0, "write": 0, "timeout": 0}
    return {"rps": rps, "total": total, "non2xx": int(non2xx.group(1)) if non2xx else 0, **errs}


def under_load(port, master_pid, hups, interval, connections):
    """wrk for the whole HUP sequence; HUPs start 1 s into it."""
    seconds = int(hups * interval + 3)
    result = {}
    t = threading.Thread(target=lambda: result.update(run_wrk(port, seconds, connections)))
    t.start()
    time.sleep(1)
    for _ in range(hups):
        os.kill(master_pid, signal.SIGHUP)
        time.sleep(interval)
    t.join()
    return result


def presup_run(args):
    port = free_port()
    d = tempfile.mkdtemp(prefix="presup-bench-")
    cfg = os.path.join(d, "supervisor.toml")
    with open(cfg, "w") as f:
        f.write(f"""
graceful_timeout = "10s"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"
backlog = 1024
[workers]
command = ["python3", "{ROOT}/examples/demo/app.py"]
count = 4
min_uptime = "200ms"
""")
    log = open(os.path.join(d, "presup.log"), "w")
    p = subprocess.Popen([BIN, "-c", cfg], stderr=log, stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        result = under_load(port, p.pid, args.hups, args.interval, args.connections)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    with open(os.path.join(d, "presup.log")) as f:
        text = f.read()
    result["reloads"] = text.count("reload done")
    result["rolled_back"] = text.count("reload undone")
    return result


def gunicorn_run(args):
    port = free_port()
    p = subprocess.Popen(
        ["gunicorn", "-w", "4", "-k", "sync", "-b", f"127.0.0.1:{port}", "--backlog", "1024",
         "--chdir", os.path.join(ROOT, "bench"), "wsgi_app:app"],
        stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        time.sleep(0.5)  # let all 4 workers boot before the load starts
        result = under_load(port, p.pid, args.hups, args.interval, args.connections)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hups", type=int, default=20)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    missing = [t for t in ("wrk", "gunicorn") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install wrk; pip install gunicorn)")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    print(f"HTTP load (wrk, {args.connections} connections) on 4 workers during {args.hups} HUPs, "
          f"one every {args.interval}s; {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    rows = [("presup", presup_run(args)), ("gunicorn 4 sync", gunicorn_run(args))]
    print(f"{'':18}{'req/s':>9}{'requests':>10}{'non-2xx':>9}{'connect':>9}{'read':>6}{'write':>7}{'timeout':>9}")
    for name, r in rows:
        print(f"{name:18}{r['rps']:>9.0f}{r['total']:>10}{r['non2xx']:>9}{r['connect']:>9}{r['read']:>6}"
              f"{r['write']:>7}{r['timeout']:>9}")
    p = rows[0][1]
    print(f"presup: {p['reloads']} reloads completed, {p['rolled_back']} rolled back "
          f"(a HUP during a rollout supersedes it)")


if __name__ == "__main__":
    sys.exit(main())
