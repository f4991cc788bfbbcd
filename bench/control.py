#!/usr/bin/env python3
"""Figures of the control socket and the metrics server. Prints them; asserts nothing.

    python3 bench/control.py            # builds presup --release first (--no-build: not)

- wall time of one `presup status` (the whole command: exec, finding the master, the request,
  the table with each worker's RSS/PSS), median of 20, with 4 and with 64 workers: through
  `--control PATH`, and through `-c FILE` (discovery, the config having no `control` key)
- wall time of one scrape of `/metrics` (the metrics server asks the master and reads /proc),
  median of 20, with 4 and with 64 workers
- the master's wake-ups over 10 idle seconds with the control socket and the metrics server
  there but no client, and with one client connected that says nothing (the master cuts it
  after its 5 s timeout), counted as bench/master.py counts them: voluntary context switches

Standard library only. Everything runs on loopback in a temp dir and is stopped at the end.
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from master import BIN, ROOT, Master, fmt, status_field


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(count, port):
    return f"""
graceful_timeout = "5s"
[metrics]
http = "127.0.0.1:{port}"
[workers]
command = ["sleep", "100000"]
count = {count}
min_uptime = "100ms"
"""


def timed(fn, runs=20):
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        fn()
        times.append((time.monotonic() - t0) * 1000)
    return times


def status(args, cwd):
    out = subprocess.run([BIN, *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"presup {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out.stdout


def scrape(port):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n", 1)[0]
    if b" 200 " not in head:
        raise SystemExit(f"scrape failed: {data[:300]!r}")
    return data


def has_status():
    """Whether this build has `presup status` (the control socket's CLI)."""
    return subprocess.run([BIN, "status", "--help"], capture_output=True).returncode == 0


def control_socket(m):
    """The master's control socket: control.sock in its runtime directory."""
    answer = json.loads(status(["-c", os.path.join(m.dir, "supervisor.toml"), "status", "--json"], m.dir))
    st = answer.get("status", answer)
    return os.path.join(st["master"]["runtime_dir"], "control.sock")


def bench_requests(n, rows, cli):
    port = free_port()
    m = Master(config(n, port))
    m.wait_for("ready: all workers up")
    m.wait_for("singleton ready")
    cfg = os.path.join(m.dir, "supervisor.toml")
    if cli:
        sock = control_socket(m)
        rows.append((f"presup status --control, {n} workers", timed(lambda: status(["status", "--control", sock], m.dir))))
        rows.append((f"presup status -c FILE, {n} workers", timed(lambda: status(["-c", cfg, "status"], m.dir))))
    rows.append((f"scrape /metrics, {n} workers", timed(lambda: scrape(port))))
    m.stop()


def bench_idle(cli):
    port = free_port()
    m = Master(config(4, port))
    m.wait_for("ready: all workers up")
    m.wait_for("singleton ready")
    scrape(port)  # once, so that every lazy path has run
    pid = m.proc.pid
    # Without the CLI, the socket is found where the master makes it: its runtime directory,
    # named presup-<pid>-<hex> in the temp dir here (no RUNTIME_DIRECTORY or XDG_RUNTIME_DIR).
    sock = control_socket(m) if cli else None
    if sock is None:
        base = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        dirs = [d for d in os.listdir(base) if d.startswith(f"presup-{pid}-")]
        sock = os.path.join(base, dirs[0], "control.sock")
    time.sleep(1)
    before = status_field(pid, "voluntary_ctxt_switches")
    time.sleep(10)
    quiet = status_field(pid, "voluntary_ctxt_switches") - before
    c = socket.socket(socket.AF_UNIX)
    c.connect(sock)
    before = status_field(pid, "voluntary_ctxt_switches")
    time.sleep(10)
    held = status_field(pid, "voluntary_ctxt_switches") - before
    c.close()
    m.stop()
    return quiet, held


def main():
    if "--no-build" not in sys.argv:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    print(f"presup control socket and metrics figures, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    cli = has_status()
    rows = []
    for n in (4, 64):
        bench_requests(n, rows, cli)
    quiet, held = bench_idle(cli)
    lines = [(name, fmt(times)) for name, times in rows]
    if not cli:
        lines.append(("presup status", "n/a: this build has no `presup status`"))
    lines.append(("master wake-ups over 10 idle s", f"{quiet:5d}      (control socket and metrics server up, no client)"))
    lines.append(("... one silent client connected", f"{held:5d}      (the master cuts it after its 5 s timeout)"))
    width = max(len(name) for name, _ in lines)
    print(f"{'':{width}}  median of 20")
    for name, text in lines:
        print(f"{name:{width}}  {text}")


if __name__ == "__main__":
    main()
