#!/usr/bin/env python3
"""presup and gunicorn side by side, in one run, on the same small HTTP app.

    bench/run                 # full run (builds presup --release first)
    bench/run --quick         # fewer repeats
    bench/run --help          # every option

Both serve the same answer, "slot N pid P generation G": presup runs bench/worker.py
(examples/demo/app.py plus a /sleep and a /hold route), gunicorn runs bench/wsgi_app.py with
sync workers. Both run on the same Python interpreter, resolved once from `python3` (a pyenv shim
is looked through: the shim is a shell script that costs tens of milliseconds per start).

"A worker answers" means it sent an HTTP answer naming its pid: the client opens N connections
to /hold; each worker answers one and then holds it, so the N answers come from N distinct
workers, each as soon as it accepts. Times are medians of repeated runs, with min and max.

Everything it starts is stopped when it ends, Ctrl-C included: the script is a child subreaper
(orphans come back to it) and kills whatever is left under it on every way out.
"""

import argparse
import ctypes
import datetime
import os
import platform
import random
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "presup")
PR_SET_CHILD_SUBREAPER = 36


# ---------------------------------------------------------------- processes


def proc_stat(pid):
    """(state, ppid) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def children_of(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st and st[1] == pid:
                out.append(int(entry))
    return out


def descendants(pid):
    ppids = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st:
                ppids[int(entry)] = st[1]
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in ppids.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def reap_orphans(known=()):
    """Reap zombies reparented to this script (it is a subreaper), leaving Popen's own alone."""
    for pid in children_of(os.getpid()):
        if pid not in known and not alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def kill_everything_below_me():
    me = os.getpid()
    for _ in range(5):
        pids = descendants(me)
        live = [p for p in pids if alive(p)]
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in children_of(me):
            try:
                os.waitpid(pid, 0 if pid in live else os.WNOHANG)
            except ChildProcessError:
                pass
        if not live:
            return
        time.sleep(0.05)


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def smaps_kb(pid, field):
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def threads(pid):
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def cpu_seconds(pid):
    """Time on a CPU of all the process's threads, from schedstat (nanoseconds; /proc/PID/stat
    only counts 10 ms ticks)."""
    total = 0
    for tid in threads(pid):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def wakeups(pid):
    """Voluntary + involuntary context switches of all the process's threads."""
    return sum(status_kb(f"{pid}/task/{tid}", "voluntary_ctxt_switches")
               + status_kb(f"{pid}/task/{tid}", "nonvoluntary_ctxt_switches") for tid in threads(pid))


# ---------------------------------------------------------------- HTTP


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Request:
    """One HTTP/1.0 GET on its own connection, read without blocking."""

    def __init__(self, port, path):
        # A /hold stays open until released; any other request is closed once answered (a
        # server that lingers for the client's close, as gunicorn's close_graceful does, must
        # not be kept waiting by the benchmark).
        self.keep = path.startswith("/hold")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(f"GET {path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        self.sock.setblocking(False)
        self.buf = b""
        self.status = self.pid = self.error = self.done_at = None

    @property
    def done(self):
        return self.done_at is not None

    def on_readable(self):
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.error, self.done_at = type(e).__name__, time.monotonic()
            return
        if not data:
            self.error, self.done_at = "closed without an answer", time.monotonic()
            return
        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = re.search(rb"(?i)content-length:\s*(\d+)", head)
        if length and len(body) < int(length.group(1)):
            return
        self.status = int(head.split()[1])
        pid = re.search(rb"pid (\d+)", body)
        self.pid = int(pid.group(1)) if pid else None
        self.done_at = time.monotonic()

    def close(self):
        self.sock.close()


def wait_requests(requests, until, timeout=60.0):
    """Read answers until `until(requests)` holds (or every request is done); False on timeout."""
    sel = selectors.DefaultSelector()
    for r in requests:
        if not r.done:
            sel.register(r.sock, selectors.EVENT_READ, r)
    end = time.monotonic() + timeout
    try:
        while not until(requests) and not all(r.done for r in requests):
            left = end - time.monotonic()
            if left <= 0:
                return False
            for key, _ in sel.select(min(left, 0.5)):
                key.data.on_readable()
                if key.data.done:
                    sel.unregister(key.fileobj)
                    if not key.data.keep:
                        key.data.close()
        return True
    finally:
        sel.close()


def connect_when_listening(port, server, timeout=30.0):
    """The first /hold request, sent as soon as the port accepts connections."""
    end = time.monotonic() + timeout
    while True:
        try:
            return Request(port, "/hold")
        except ConnectionRefusedError:
            if server.proc.poll() is not None:
                server.fail(f"exited with {server.proc.returncode} before listening")
            if time.monotonic() > end:
                server.fail("never listened")
            time.sleep(0.001)


def hold_workers(port, server, n, timeout=60.0):
    """Open n /hold connections; returns them once n distinct workers answered."""
    reqs = [connect_when_listening(port, server)]
    reqs += [Request(port, "/hold") for _ in range(n - 1)]
    ok = wait_requests(reqs, lambda rs: sum(r.status == 200 for r in rs) >= n, timeout)
    bad = [r for r in reqs if r.done and r.status != 200]
    if not ok or bad:
        for r in reqs:
            r.close()
        server.fail(f"{sum(r.status == 200 for r in reqs)} of {n} workers answered"
                    + (f"; errors: {sorted({r.error or r.status for r in bad}, key=str)}" if bad else ""))
    pids = {r.pid for r in reqs}
    if len(pids) != n:
        server.fail(f"{n} held answers came from {len(pids)} distinct pids")
    return reqs


def release(reqs):
    for r in reqs:
        r.close()


def run_wrk(port, seconds, connections):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True,
    ).stdout
    return wrk_figures(out)


def wrk_figures(out):
    """What wrk printed (at its end, or on SIGINT): requests, requests/s and the errors."""
    total = re.search(r"(\d+) requests in", out)
    if not total:
        raise RuntimeError(f"wrk printed no figures:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(map(int, errors.groups())) if errors else 0
    return {
        "requests": int(total.group(1)),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors,
        "detail": errors.group(0) if errors else "no socket errors",
    }


# ---------------------------------------------------------------- the two servers


class Server:
    """A master under test: started on `port` with `n` workers, its output in a temp dir."""

    name = "?"

    def __init__(self, py, tmp):
        self.py, self.tmp = py, tmp
        self.proc = None
        self.runs = 0

    def argv(self, n, port, variant):
        raise NotImplementedError

    def start(self, n, port, variant=""):
        self.port = port
        self.runs += 1
        self.log_path = os.path.join(self.tmp, f"{self.name}-{self.runs:03}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.argv(n, port, variant), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
            cwd=self.tmp, start_new_session=True,
        )
        return self.proc

    def workers(self):
        return sorted(children_of(self.proc.pid))

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def fail(self, why):
        tail = "\n".join(self.log_text().splitlines()[-15:])
        raise RuntimeError(f"{self.name}: {why}\n--- last lines of its log ---\n{tail}")

    def stop(self, timeout=60):
        """TERM, wait; then anything left below the master is killed."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # One server runs at a time: whatever is still below this script is its leftover
        # (a worker orphaned to this subreaper, a straggler), killed and reaped here.
        kill_everything_below_me()
        self.log.close()
        self.proc = None


class Presup(Server):
    name = "presup"

    def argv(self, n, port, variant):
        backoff = 'restart_backoff = { reset = "200ms" }' if variant == "respawn" else ""
        cfg = os.path.join(self.tmp, "supervisor.toml")
        with open(cfg, "w") as f:
            f.write(f"""
[[listen]]
name = "http"
address = "127.0.0.1:{port}"
backlog = 1024

[workers]
command = ["{self.py}", "{ROOT}/bench/worker.py"]
count = {n}
min_uptime = "200ms"
{backoff}
""")
        return [BIN, "-c", cfg]


class Gunicorn(Server):
    name = "gunicorn"

    def argv(self, n, port, variant):
        return [self.py, "-m", "gunicorn", "-w", str(n), "-k", "sync", "-b", f"127.0.0.1:{port}",
                "--backlog", "1024", "--chdir", os.path.join(ROOT, "bench"), "wsgi_app:app"]


# ---------------------------------------------------------------- the figures


def fig_start(server, n, _):
    """ms from launch until n workers answered (n distinct pids)."""
    port = free_port()
    t0, wall0 = time.monotonic(), time.time()
    server.start(n, port)
    reqs = hold_workers(port, server, n)
    last = max(r.done_at for r in reqs)
    release(reqs)
    out = {f"start{n}": (last - t0) * 1000}
    if isinstance(server, Presup):  # when its log says the n-th worker was exec'd
        spawned = re.findall(r"^(\S+)Z .*worker spawned", server.log_text(), re.M)
        if len(spawned) >= n:
            at = datetime.datetime.fromisoformat(spawned[n - 1]).replace(tzinfo=datetime.timezone.utc)
            out[f"exec{n}"] = (at.timestamp() - wall0) * 1000
    server.stop()
    return out


def fig_respawn(server, repeats, _):
    """ms from a worker's SIGKILL until its replacement answers (4 workers, the 3 others held)."""
    port = free_port()
    server.start(4, port, "respawn")
    out = []
    for _ in range(repeats):
        reqs = hold_workers(port, server, 4)
        victim = reqs[0].pid
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new = Request(port, "/hold")
        if not wait_requests([new], lambda rs: rs[0].done, 30) or new.status != 200:
            server.fail(f"no replacement answered after SIGKILL ({new.error or new.status})")
        if new.pid in {r.pid for r in reqs}:
            server.fail(f"after SIGKILL the answer came from an old worker {new.pid}")
        out.append((new.done_at - t0) * 1000)
        release(reqs + [new])
        time.sleep(0.5)  # presup: the replacement outlives `reset`, so its slot is healthy again
        reap_orphans()
    server.stop()
    return {"respawn": out}


def fig_idle(server, _, args):
    """Master RSS/PSS with 4 workers, and its wake-ups and CPU over an idle window."""
    port = free_port()
    server.start(4, port)
    release(hold_workers(port, server, 4))
    time.sleep(1.0)  # the answers' aftermath (and presup's min_uptime deadlines) are over
    pid = server.proc.pid
    rss, pss, nthreads = status_kb(pid, "VmRSS"), smaps_kb(pid, "Pss"), len(threads(pid))
    w0, c0 = wakeups(pid), cpu_seconds(pid)
    time.sleep(args.idle)
    w1, c1 = wakeups(pid), cpu_seconds(pid)
    server.stop()
    return {"rss": rss / 1024, "pss": pss / 1024, "threads": nthreads, "wakeups": w1 - w0, "idle_cpu": (c1 - c0) * 1000}


def under_load(server, args, event):
    """wrk on 4 workers while `event()` runs args.events times, args.interval apart."""
    port = free_port()
    server.start(4, port)
    release(hold_workers(port, server, 4))
    seconds = int(args.events * args.interval + 3)
    result, failure = {}, []

    def load():
        try:
            result.update(run_wrk(port, seconds, args.connections))
        except Exception as e:  # noqa: BLE001 - reported below
            failure.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    time.sleep(1)
    for _ in range(args.events):
        event()
        time.sleep(args.interval)
    t.join()
    server.stop()
    if failure:
        raise failure[0]
    return result


def fig_hup(server, _, args):
    def hup():
        server.proc.send_signal(signal.SIGHUP)

    r = under_load(server, args, hup)
    r["log"] = os.path.basename(server.log_path)
    server.wrk_details = getattr(server, "wrk_details", []) + [("HUPs", r)]
    out = {"hup_errors": r["non2xx"] + r["socket_errors"], "hup_rps": r["rps"]}
    if isinstance(server, Presup):
        out["hup_done"] = server.log_text().count("reload done")
    return out


def fig_kill(server, _, args):
    rng = random.Random(7)

    def kill_one():
        pids = server.workers()
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
            except ProcessLookupError:
                pass

    r = under_load(server, args, kill_one)
    r["log"] = os.path.basename(server.log_path)
    server.wrk_details = getattr(server, "wrk_details", []) + [("kills", r)]
    return {"kill_errors": r["non2xx"] + r["socket_errors"], "kill_rps": r["rps"]}


def fig_term(server, _, args):
    """TERM to the master with 4 one-second requests in flight and 4 more queued behind them."""
    port = free_port()
    server.start(4, port)
    release(hold_workers(port, server, 4))
    in_flight = [Request(port, "/sleep?1") for _ in range(4)]
    time.sleep(0.3)  # accepted by the 4 idle workers
    queued = [Request(port, "/sleep?1") for _ in range(4)]
    time.sleep(0.1)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    wait_requests(in_flight + queued, lambda rs: False, 30)
    release(in_flight + queued)
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    exit_ms = (time.monotonic() - t0) * 1000
    server.stop()
    failed = [r.error or f"HTTP {r.status}" if r.done else "no answer" for r in in_flight + queued
              if r.status != 200]
    server.term_failures = getattr(server, "term_failures", []) + failed
    return {
        "term_inflight": sum(r.status == 200 for r in in_flight),
        "term_queued": sum(r.status == 200 for r in queued),
        "term_exit": exit_ms,
    }


def fig_orphans(server, _, args):
    """Workers alive 1 s and 10 s after the master's SIGKILL; does the port still answer then?"""
    port = free_port()
    server.start(4, port)
    release(hold_workers(port, server, 4))
    pids = server.workers()
    t0 = time.monotonic()
    server.proc.kill()
    server.proc.wait()
    out = {}
    for at in (1, 10):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        out[f"orphans{at}"] = sum(alive(p) for p in pids)
    try:
        r = Request(port, "/")
        wait_requests([r], lambda rs: rs[0].done, 2)
        out["orphan_port"] = int(r.status == 200)
        r.close()
    except OSError:
        out["orphan_port"] = 0
    server.stop()
    return out


# ---------------------------------------------------------------- the table

# (key, label, unit, format); the ratio is presup / gunicorn of the medians.
ROWS = [
    ("rss", "master RSS, 4 workers", "MB", "{:.1f}"),
    ("pss", "master PSS, 4 workers", "MB", "{:.1f}"),
    ("threads", "master threads", "", "{:g}"),
    ("wakeups", "master wake-ups over {idle:g} idle s (context switches)", "", "{:g}"),
    ("idle_cpu", "master CPU over {idle:g} idle s", "ms", "{:.2f}"),
    ("start1", "start → 1 worker answers", "ms", "{:.0f}"),
    ("start4", "start → 4 workers answer", "ms", "{:.0f}"),
    ("start16", "start → 16 workers answer", "ms", "{:.0f}"),
    ("start64", "start → 64 workers answer", "ms", "{:.0f}"),
    ("respawn", "worker SIGKILL → replacement answers (4 workers)", "ms", "{:.1f}"),
    ("hup_errors", "errors under wrk during {events} HUPs", "", "{:g}"),
    ("kill_errors", "errors under wrk during {events} worker SIGKILLs", "", "{:g}"),
    ("term_inflight", "TERM: 1 s requests in flight answered 200 (of 4)", "", "{:g}"),
    ("term_queued", "TERM: 1 s requests queued behind them answered 200 (of 4)", "", "{:g}"),
    ("term_exit", "TERM → master exit (with those 8 requests)", "ms", "{:.0f}"),
    ("orphans1", "workers alive 1 s after kill -9 of the master (of 4)", "", "{:g}"),
    ("orphans10", "workers alive 10 s after kill -9 of the master (of 4)", "", "{:g}"),
    ("orphan_port", "port still answers 10 s after kill -9 of the master (runs)", "", "{:g}"),
]


def summary(values, fmt):
    if not values:
        return "–"
    med = statistics.median(values)
    text = fmt.format(med)
    if len(values) > 1 and min(values) != max(values):
        text += f" ({fmt.format(min(values))}–{fmt.format(max(values))})"
    return text


def ratio(p, g):
    if not p or not g:
        return "–"
    mp, mg = statistics.median(p), statistics.median(g)
    if mg == 0:
        return "–" if mp == 0 else "∞"
    r = mp / mg
    return f"{r:.2f}" if r < 10 else f"{r:.0f}"


def table(results, args):
    rows = [("figure", "presup", "gunicorn", "presup / gunicorn")]
    for key, label, unit, fmt in ROWS:
        p, g = results["presup"].get(key, []), results["gunicorn"].get(key, [])
        if key == "orphan_port":
            p, g = [sum(p)], [sum(g)]
            label = label.replace("(runs)", f"(runs, of {len(results['presup'].get('orphans1', []))})")
            if not results["presup"].get("orphans1"):
                continue
        if not p and not g:
            continue
        name = label.format(idle=args.idle, events=args.events) + (f" ({unit})" if unit else "")
        n = max(len(p), len(g))
        rows.append((f"{name}, n={n}" if n > 1 else name, summary(p, fmt), summary(g, fmt), ratio(p, g)))
    return markdown(rows)


def markdown(rows):
    """`rows` (the first is the header) as a Markdown table, its columns aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(widths[j]) for j, c in enumerate(r)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ---------------------------------------------------------------- setup and main


def real_python():
    """The interpreter `python3` really runs (pyenv shims are shell scripts that exec it)."""
    out = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out or sys.executable


def ensure_gunicorn(py):
    """The interpreter to run (for both servers) and gunicorn's version; installs gunicorn with
    pip when it is missing, into a venv under target/ when the system's pip refuses (PEP 668)."""

    def has(python):
        return subprocess.run([python, "-c", "import gunicorn"], capture_output=True).returncode == 0

    if not has(py):
        print(f"installing gunicorn: {py} -m pip install --quiet gunicorn", flush=True)
        if subprocess.run([py, "-m", "pip", "install", "--quiet", "gunicorn"]).returncode != 0:
            venv = os.path.join(ROOT, "target", "bench-venv")
            vpy = os.path.join(venv, "bin", "python3")
            print(f"pip refused; trying a venv: {venv}", flush=True)
            ok = os.path.exists(vpy) or subprocess.run([py, "-m", "venv", venv]).returncode == 0
            if ok and not has(vpy):
                subprocess.run([vpy, "-m", "pip", "install", "--quiet", "gunicorn"])
            if not ok or not has(vpy):
                raise SystemExit("gunicorn is missing and pip could not install it: install it "
                                 "(pip install gunicorn; on Debian: apt-get install python3-venv, "
                                 "or python3-pip)")
            py = vpy
    version = subprocess.run([py, "-m", "gunicorn", "--version"], capture_output=True, text=True).stdout
    return py, version.strip()


def ensure_wrk():
    if shutil.which("wrk"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk: apt-get install -y wrk", flush=True)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], stdout=subprocess.DEVNULL)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], stdout=subprocess.DEVNULL)
        if shutil.which("wrk"):
            return True
    print("wrk is missing: install it (Debian/Ubuntu: sudo apt-get install wrk) for the rows under "
          "HTTP load; they are left out of this run", flush=True)
    return False


def python_start_ms(py, n=10):
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run([py, "-c", "pass"], check=True)
        times.append((time.monotonic() - t0) * 1000)
    return statistics.median(times)


def machine(py, gunicorn_version):
    def first(path, prefix):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(prefix):
                        return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1].strip('"\n')
        except OSError:
            pass
        return "?"

    mem_kb = int(first("/proc/meminfo", "MemTotal").split()[0])
    pyver = subprocess.run([py, "-c", "import platform; print(platform.python_version())"],
                           capture_output=True, text=True).stdout.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip() \
        if shutil.which("wrk") else "missing"
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "src", "Cargo.toml"],
                           capture_output=True, text=True).stdout.strip()
    return [
        f"CPUs: {os.cpu_count()} ({first('/proc/cpuinfo', 'model name')}), RAM {mem_kb / 1024 / 1024:.0f} GiB",
        f"kernel: {platform.release()}, {first('/etc/os-release', 'PRETTY_NAME=')}",
        f"Python {pyver} ({py}), {gunicorn_version}, {wrk}",
        f"presup: commit {commit}{' with uncommitted changes under src/' if dirty else ''}",
    ]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 quick and 1 slow repeat (about 3 minutes)")
    ap.add_argument("--repeat", type=int, help="runs of the quick figures (start, TERM; respawn: "
                    "twice as many kills); default 5")
    ap.add_argument("--repeat-slow", type=int,
                    help="runs of the slow ones (idle, load, orphans); default 3")
    ap.add_argument("--events", type=int, default=20, help="HUPs and worker kills under load (default 20)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between them (default 1)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--idle", type=float, default=10.0, help="idle window in seconds (default 10)")
    ap.add_argument("--only", help="comma-separated subset: idle,start,respawn,hup,kill,term,orphans")
    ap.add_argument("--no-build", action="store_true", help="use target/release/presup as it is")
    ap.add_argument("--keep-logs", action="store_true", help="keep every master's log (path printed)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the header, table and notes to FILE")
    args = ap.parse_args()
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.repeat_slow = args.repeat_slow or (1 if args.quick else 3)
    return args


def build_plan(args, have_wrk):
    """(figure, function, argument, runs) in the order they run."""
    only = set(args.only.split(",")) if args.only else None

    def wanted(name):
        return only is None or name in only

    plan = []
    if wanted("idle"):
        plan.append(("idle", fig_idle, None, args.repeat_slow))
    if wanted("start"):
        for n in (1, 4, 16, 64):
            plan.append((f"start {n}", fig_start, n, args.repeat))
    if wanted("respawn"):
        plan.append(("respawn", fig_respawn, args.repeat * 2, 1))
    if have_wrk and wanted("hup"):
        plan.append(("hup", fig_hup, None, args.repeat_slow))
    if have_wrk and wanted("kill"):
        plan.append(("kill", fig_kill, None, args.repeat_slow))
    if wanted("term"):
        plan.append(("term", fig_term, None, args.repeat))
    if wanted("orphans"):
        plan.append(("orphans", fig_orphans, None, args.repeat_slow))
    return plan


def run_plan(plan, servers, args):
    results = {s.name: {} for s in servers}
    for figure, fn, arg, runs in plan:
        print(f"  {figure}: {runs} run(s) each", end="", flush=True)
        for _ in range(runs):
            for server in servers:  # interleaved, so drifting load hits both alike
                try:
                    out = fn(server, arg, args)
                finally:
                    server.stop()
                for k, v in out.items():
                    results[server.name].setdefault(k, []).extend(v if isinstance(v, list) else [v])
            print(".", end="", flush=True)
        print(flush=True)
    return results


def notes(results, servers, args):
    out = []
    hups = results["presup"].get("hup_done")
    if hups:
        out.append(f"presup completed {statistics.median(hups):g} of {args.events} reloads per run "
                   f"(median; a HUP during a rollout supersedes it)")
    if results["presup"].get("respawn"):
        out.append("respawn: presup runs with restart_backoff.reset = 200ms and each kill comes 0.5 s "
                   "after the last, so every kill hits a healthy slot, restarted at once (by default "
                   "a slot that dies again within 10 s waits 100 ms, doubling up to 30 s)")
    for n in (1, 4, 16, 64):
        if results["presup"].get(f"exec{n}"):
            out.append(f"presup: start → {n} worker{'s' if n > 1 else ''} exec'd (from its log): "
                       f"{summary(results['presup'][f'exec{n}'], '{:.0f}')} ms")
    for server in servers:
        failures = getattr(server, "term_failures", [])
        if failures:
            kinds = ", ".join(f"{failures.count(k)} × {k}" for k in sorted(set(failures)))
            out.append(f"{server.name}: on TERM, the requests not answered 200 got: {kinds}")
    for server in servers:
        for what in ("HUPs", "kills"):
            runs = [r for w, r in getattr(server, "wrk_details", []) if w == what]
            if runs:
                out.append(f"{server.name}, during the {what}: " + "; ".join(
                    f"{r['rps']:.0f} req/s, {r['non2xx']} non-2xx, {r['detail']}"
                    + (f" (log {r['log']})" if args.keep_logs else "") for r in runs))
    return out


def main():
    args = parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of what we start come back to us

    started = time.monotonic()
    if not args.no_build:
        print("cargo build --release", flush=True)
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    py = real_python()
    on_path = os.environ.get("BENCH_PYTHON3") or shutil.which("python3") or py
    shim = os.path.realpath(on_path) != os.path.realpath(py)
    py, gunicorn_version = ensure_gunicorn(py)
    have_wrk = ensure_wrk()
    py_ms = python_start_ms(py)

    header = [f"presup vs gunicorn (sync workers), {time.strftime('%Y-%m-%d %H:%M')}"] + machine(py, gunicorn_version)
    header.append(
        f"interpreter for presup's workers and for gunicorn: {py}"
        + (f" (python3 on PATH is {on_path}, a shim or wrapper: looked through)" if shim else "")
        + f"; its start+exit takes {py_ms:.0f} ms here (presup execs it per worker, gunicorn forks)")
    header.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("\n".join(header), flush=True)

    tmp = tempfile.mkdtemp(prefix="presup-bench-")
    servers = [Presup(py, tmp), Gunicorn(py, tmp)]
    try:
        results = run_plan(build_plan(args, have_wrk), servers, args)
    except BaseException:
        print(f"\nlogs of every master: {tmp}", file=sys.stderr)
        raise
    text = table(results, args)
    footer = [
        "ratio: presup / gunicorn of the medians (below 1: presup's figure is smaller); "
        "cells: median (min–max) over n runs",
        f"errors: non-2xx answers + wrk socket errors (connect, read, write, timeout), "
        f"wrk -t2 -c{args.connections} on 4 workers, one event every {args.interval:g} s",
        *notes(results, servers, args),
        f"load average at end: {os.getloadavg()[0]:.2f}; took {(time.monotonic() - started) / 60:.1f} min",
    ]
    if args.keep_logs:
        footer.append(f"logs of every master: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{text}\n\n" + "\n".join(footer))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(f"- {h}" for h in header) + "\n\n" + text + "\n\n"
                    + "\n".join(f"- {x}" for x in footer) + "\n")


def on_signal(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # INT too: `&` in a script ignores it
        signal.signal(sig, on_signal)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        kill_everything_below_me()
