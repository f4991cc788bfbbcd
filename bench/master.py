#!/usr/bin/env python3
"""Figures of the master itself. Prints them; asserts nothing.

    python3 bench/master.py            # builds presup --release first

- master RSS / PSS with 4 workers
- the master's voluntary context switches (wake-ups) over 10 idle seconds (target: 0)
- time from launch until 64 trivial workers are all running (exec'd)
- time from a worker's SIGKILL until its replacement has exec'd (median of 20)

Standard library only. Everything runs on loopback in a temp dir and is stopped at the end.
Its workers are `sleep`, so these are the master's own costs; bench/run measures the same
figures with Python HTTP workers, side by side with gunicorn.
"""

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "presup")


class Master:
    """A presup master whose log lines are timestamped as they arrive."""

    def __init__(self, toml, args=()):
        self.dir = tempfile.mkdtemp(prefix="presup-bench-")
        path = os.path.join(self.dir, "supervisor.toml")
        with open(path, "w") as f:
            f.write(toml)
        self.lines = []
        self.cv = threading.Condition()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [BIN, "-c", path, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True, cwd=self.dir,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            with self.cv:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.cv.notify_all()

    def wait_for(self, needle, n=1, timeout=60):
        """The arrival time of the n-th line containing needle."""
        end = time.monotonic() + timeout
        with self.cv:
            while True:
                hits = [t for t, l in self.lines if needle in l]
                if len(hits) >= n:
                    return hits[n - 1]
                left = end - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"timed out waiting for {needle!r} x{n}:\n" + "\n".join(l for _, l in self.lines[-20:]))
                self.cv.wait(left)

    def count(self, needle):
        with self.cv:
            return sum(1 for _, l in self.lines if needle in l)

    def worker_pids(self):
        """The master's children but its watcher (which kills the children if the master dies)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        with self.cv:
            watchers = {l.split("pid=")[1].split()[0] for _, l in self.lines
                        if "watcher started" in l and "pid=" in l}
        return [int(p) for p in out.split() if p not in watchers]

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def status_field(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def smaps_field(pid, field):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def config(count, extra=""):
    return f"""
graceful_timeout = "5s"
[[listen]]
name = "http"
address = "127.0.0.1:0"
[workers]
command = ["sleep", "100000"]
count = {count}
min_uptime = "100ms"
{extra}
"""


def bench_idle():
    m = Master(config(4))
    m.wait_for("ready: all workers up")
    pid = m.proc.pid
    rss, pss = status_field(pid, "VmRSS"), smaps_field(pid, "Pss")
    before = status_field(pid, "voluntary_ctxt_switches")
    cpu_before = read_cpu(pid)
    time.sleep(10)
    after = status_field(pid, "voluntary_ctxt_switches")
    cpu = read_cpu(pid) - cpu_before
    m.stop()
    print(f"master RSS with 4 workers          {rss / 1024:.1f} MB (PSS {pss / 1024:.1f} MB)")
    print(f"master wake-ups over 10 idle s      {after - before} voluntary context switches")
    print(f"master CPU over 10 idle s           {cpu * 1000:.1f} ms")


def read_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def bench_start(n, runs=5):
    times = []
    for _ in range(runs):
        m = Master(config(n))
        t = m.wait_for("worker spawned", n)
        times.append((t - m.started) * 1000)
        m.stop()
    print(f"launch -> {n:>2} workers exec'd          {fmt(times)}")


def bench_respawn(runs=20):
    # A worker that stayed up 100 ms counts as healthy: each kill restarts at once.
    m = Master(config(4, 'restart_backoff = { reset = "100ms" }'))
    m.wait_for("ready: all workers up")
    times = []
    for i in range(runs):
        spawned = m.count("worker spawned")
        victim = m.worker_pids()[0]
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        t1 = m.wait_for("worker spawned", spawned + 1)
        times.append((t1 - t0) * 1000)
        time.sleep(0.2)  # let the replacement pass `reset`, so its backoff stays at zero
    m.stop()
    print(f"SIGKILL -> replacement exec'd       {fmt(times)}")


def fmt(ms):
    return f"{statistics.median(ms):7.1f} ms  (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)})"


def main():
    if "--no-build" not in sys.argv:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    print(f"presup master figures, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    bench_idle()
    for n in (1, 4, 16, 64):
        bench_start(n)
    bench_respawn()


if __name__ == "__main__":
    main()
