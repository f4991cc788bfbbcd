#!/usr/bin/env python3
"""presup's stem (`[workers] preload = true`) against gunicorn --preload and presup's exec'd
workers (`preload = false`), side by side in one run, on one Python app holding about 200 MB
of Python objects (bench/stem_app.py). Prints figures; asserts nothing.

    python3 bench/stem.py              # about 10 minutes (builds presup --release first)
    python3 bench/stem.py --quick      # about 4 minutes
    python3 bench/stem.py --help       # every option

The app is the same file for the three: gunicorn imports it in its master (--preload) and
serves it with sync workers; presup runs `python3 stem_app.py`, served by the standard
library's wsgiref on presup's listener, one request at a time, as a stem that forks the
workers (preload = true) or in every exec'd worker (preload = false).

Figures:
- total PSS (the sum of /proc/PID/smaps_rollup's Pss over the master and every process below
  it: presup's watcher and stem, the workers) with --workers workers, at start and after
  --walk seconds of requests that each touch every object of the app (reading a Python object
  writes its reference count, so its page is copied into the worker that reads it);
- worker SIGKILL until its replacement answers HTTP: every worker holds a /hold connection, one
  is killed and a new /hold is sent, which only the replacement can answer (median of --kills);
- start until 64 workers answer (presup stem and gunicorn --preload; 64 exec'd workers would
  each build the objects: 12 GB);
- a HUP with changed code (the app's version module rewritten) under `wrk -c64`: errors
  (non-2xx + socket errors), then, once the reload is done (presup: its log says so;
  gunicorn: every worker is a new process), how many of --samples answers come from the new
  code.

Everything it starts is stopped when it ends, Ctrl-C included (bench/run.py's machinery: the
script is a child subreaper and kills whatever is left under it).
"""

import argparse
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as bench  # noqa: E402  (bench/run.py: processes, HTTP, servers, wrk, the table's cells)

ROOT = bench.ROOT
FIGURES = ("memory", "respawn", "start", "hup")


# ---------------------------------------------------------------- the three servers


class PresupStem(bench.Server):
    name, label, preload = "presup-stem", "presup stem", True
    # A forked worker serves as it starts (the app is already imported): up once alive 200 ms.
    # (Its READY=1 could do, but the master may read it before the stem's `forked` answer
    # and drop it as a stranger's.)
    readiness = 'ready = "spawn"\nmin_uptime = "200ms"'

    def argv(self, n, port, variant):
        backoff = 'restart_backoff = { reset = "200ms" }' if variant == "respawn" else ""
        cfg = os.path.join(self.tmp, f"{self.name}.toml")
        with open(cfg, "w") as f:
            f.write(f"""
graceful_timeout = "5s"

[[listen]]
name = "http"
address = "127.0.0.1:{port}"
backlog = 1024

[workers]
command = ["{self.py}", "{ROOT}/bench/stem_app.py"]
preload = {str(self.preload).lower()}
count = {n}
{self.readiness}
boot_timeout = "300s"
{backoff}
""")
        return [bench.BIN, "-c", cfg]


class PresupExec(PresupStem):
    name, label, preload = "presup-exec", "presup exec'd", False
    # An exec'd worker serves only once it has built its objects: it says READY=1 then.
    readiness = 'ready = "notify"'


class GunicornPreload(bench.Server):
    name, label = "gunicorn-preload", "gunicorn --preload"

    def argv(self, n, port, variant):
        return [self.py, "-m", "gunicorn", "--preload", "-w", str(n), "-k", "sync",
                "-b", f"127.0.0.1:{port}", "--backlog", "1024", "--graceful-timeout", "5",
                "--chdir", os.path.join(ROOT, "bench"), "stem_app:app"]


# ---------------------------------------------------------------- helpers


def total_pss_mib(master):
    pids = [master] + bench.descendants(master)
    kib = 0
    for pid in pids:
        try:
            kib += bench.smaps_kb(pid, "Pss")
        except OSError:
            pass  # gone meanwhile (a middle process of the stem's)
    return kib / 1024


def get(port, path, timeout=60):
    """One GET on its own connection, read to its end: the Request (status, pid, buf)."""
    r = bench.Request(port, path)
    bench.wait_requests([r], lambda rs: rs[0].done, timeout)
    r.close()
    return r


def version_of(r):
    found = re.search(rb"version (\S+)", r.buf)
    return found.group(1).decode() if found and r.status == 200 else None


def write_code(code_dir, version):
    """The app's version module, replaced atomically (a stem importing it sees one or the other)."""
    path = os.path.join(code_dir, "stem_bench_code.py")
    with open(path + ".tmp", "w") as f:
        f.write(f'VERSION = "{version}"\n')
    os.rename(path + ".tmp", path)


def start_wrk(port, connections):
    """wrk in the background for as long as needed: stopped with SIGINT, it prints its figures."""
    return subprocess.Popen(
        ["wrk", "-t2", f"-c{connections}", "-d3600s", "--timeout", "5s", f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def stop_wrk(wrk):
    wrk.send_signal(signal.SIGINT)
    out, _ = wrk.communicate(timeout=30)
    return bench.wrk_figures(out)


def up(server, port, n, timeout=600):
    """Seconds from now (just after the launch) until n distinct workers answered; their pids."""
    t0 = time.monotonic()
    reqs = bench.hold_workers(port, server, n, timeout)
    at = max(r.done_at for r in reqs) - t0
    pids = {r.pid for r in reqs}
    bench.release(reqs)
    return at, pids


# ---------------------------------------------------------------- the figures


def fig_memory(server, args):
    port = bench.free_port()
    server.start(args.workers, port)
    start_s, _ = up(server, port, args.workers)
    time.sleep(1)  # the /hold connections are closed and settled
    before = total_pss_mib(server.proc.pid)
    walked, failed, stop_at = {}, [], time.monotonic() + args.walk

    def walker():
        while time.monotonic() < stop_at and not failed:
            r = get(port, "/walk")
            if r.status != 200:
                failed.append(r.error or r.status)
            else:
                walked[r.pid] = walked.get(r.pid, 0) + 1

    threads = [threading.Thread(target=walker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        server.fail(f"/walk answered {failed[0]}")
    after = total_pss_mib(server.proc.pid)
    server.stop()
    return {"up": start_s, "pss_start": before, "pss_walk": after,
            "walks": sum(walked.values()), "walkers": len(walked)}


def fig_respawn(server, args):
    port = bench.free_port()
    server.start(args.workers, port, "respawn")
    out = []
    for _ in range(args.kills):
        reqs = bench.hold_workers(port, server, args.workers, 600)
        victim = reqs[0].pid
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new = bench.Request(port, "/hold")
        if not bench.wait_requests([new], lambda rs: rs[0].done, 120) or new.status != 200:
            server.fail(f"no replacement answered after SIGKILL ({new.error or new.status})")
        if new.pid in {r.pid for r in reqs}:
            server.fail(f"after SIGKILL the answer came from an old worker {new.pid}")
        out.append((new.done_at - t0) * 1000)
        bench.release(reqs + [new])
        time.sleep(0.5)  # presup: the replacement outlives `reset`, so its slot is healthy again
        bench.reap_orphans()
    server.stop()
    return {"respawn": out}


def fig_start(server, args):
    return bench.fig_start(server, 64, args)  # {"start64": ms}


def reloaded(server, old_pids, timeout=300):
    """Waits until the HUP's reload is done: presup says so in its log (an undone reload fails);
    gunicorn has as many workers as before, none of them an old one."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if isinstance(server, PresupStem):
            log = server.log_text()
            if "undone" in log:
                server.fail("the reload was undone")
            if "reload done" in log:
                return
        else:
            now = set(server.workers())
            if len(now) == len(old_pids) and not now & old_pids:
                return
        time.sleep(0.05)
    server.fail("the reload did not end")


def fig_hup(server, args):
    write_code(args.code, "v1")
    port = bench.free_port()
    server.start(args.workers, port)
    _, pids = up(server, port, args.workers)
    old = set(server.workers()) if isinstance(server, GunicornPreload) else pids
    wrk = start_wrk(port, args.connections)
    try:
        time.sleep(2)  # wrk at full speed
        write_code(args.code, "v2")
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        reloaded(server, old)
        reload_s = time.monotonic() - t0
        versions = [version_of(get(port, "/")) for _ in range(args.samples)]
        time.sleep(2)  # and a little load after the reload
    finally:
        figures = stop_wrk(wrk)
    server.stop()
    server.wrk_details = getattr(server, "wrk_details", []) + [figures]
    return {"hup_errors": figures["non2xx"] + figures["socket_errors"], "hup_rps": figures["rps"],
            "hup_s": reload_s, "hup_new": versions.count("v2"), "hup_samples": len(versions)}


# ---------------------------------------------------------------- the run


def app_size_mib(py, entries):
    """RSS that importing the app adds, in one process: what each copy of the objects costs."""
    script = ("import os, sys\n"
              "def rss():\n"
              "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
              "before = rss()\n"
              f"sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})\n"
              "import stem_app\n"
              "print((rss() - before) / 1024)\n")
    out = subprocess.run([py, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "STEM_BENCH_ENTRIES": str(entries)})
    return float(out.stdout)


ROWS = [
    # (key, label, format, figure)
    ("up", "start → {workers} workers answer (s)", "{:.2f}", "memory"),
    ("pss_start", "total PSS at start, {workers} workers (MiB)", "{:.0f}", "memory"),
    ("pss_walk", "total PSS after {walk:g} s of walks (MiB)", "{:.0f}", "memory"),
    ("walkers", "workers that walked (of {workers})", "{:g}", "memory"),
    ("respawn", "worker SIGKILL → replacement answers, {workers} workers (ms)", "{:.1f}", "respawn"),
    ("start64", "start → 64 workers answer (ms)", "{:.0f}", "start"),
    ("hup_errors", "errors under wrk -c{connections} during a HUP with new code", "{:g}", "hup"),
    ("hup_new", "answers from the new code once reloaded (of {samples})", "{:g}", "hup"),
    ("hup_s", "HUP → reload done, {workers} workers (s)", "{:.1f}", "hup"),
    ("hup_rps", "requests/s under wrk during the HUP", "{:.0f}", "hup"),
]


def table(results, servers, args):
    rows = [("figure", *(s.label for s in servers))]
    for key, label, fmt, _ in ROWS:
        cells = [results[s.name].get(key, []) for s in servers]
        if not any(cells):
            continue
        n = max(len(c) for c in cells)
        name = label.format(**vars(args)) + (f", n={n}" if n > 1 else "")
        rows.append((name, *(bench.summary(c, fmt) for c in cells)))
    return bench.markdown(rows)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="15 s of walks, 5 kills, 1 run of the rest (about 4 minutes)")
    ap.add_argument("--workers", type=int, default=8, help="workers (default 8)")
    ap.add_argument("--walk", type=float, help="seconds of walks before the second PSS (default 60)")
    ap.add_argument("--kills", type=int, help="worker SIGKILLs per server (default 10)")
    ap.add_argument("--repeat", type=int, help="runs of the start and HUP figures (default 3)")
    ap.add_argument("--entries", type=int, default=1_300_000,
                    help="entries of the app's list, 3 objects each (default 1300000: about 200 MB)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--samples", type=int, default=100, help="answers checked after a HUP (default 100)")
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(FIGURES))
    ap.add_argument("--no-build", action="store_true", help="use target/release/presup as it is")
    ap.add_argument("--keep-logs", action="store_true", help="keep every master's log (path printed)")
    args = ap.parse_args()
    args.walk = args.walk if args.walk is not None else (15 if args.quick else 60)
    args.kills = args.kills or (5 if args.quick else 10)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.only = set(args.only.split(",")) if args.only else set(FIGURES)
    if args.only - set(FIGURES):
        ap.error(f"--only: unknown figure(s) {','.join(sorted(args.only - set(FIGURES)))}")
    return args


def plan(args, have_wrk):
    """(figure, function, runs, which servers) in the order they run."""
    out = []
    if "memory" in args.only:
        out.append(("memory", fig_memory, 1, None))
    if "respawn" in args.only:
        out.append(("respawn", fig_respawn, 1, None))
    if "start" in args.only:
        out.append(("start", fig_start, args.repeat, (PresupStem, GunicornPreload)))
    if "hup" in args.only and have_wrk:
        out.append(("hup", fig_hup, args.repeat, None))
    return out


def main():
    args = parse_args()
    ctypes.CDLL(None).prctl(bench.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    started = time.monotonic()
    if not args.no_build:
        print("cargo build --release", flush=True)
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    py, gunicorn_version = bench.ensure_gunicorn(bench.real_python())
    have_wrk = "hup" not in args.only or bench.ensure_wrk()
    if not have_wrk:
        print("wrk is missing: the HUP figure is left out (apt-get install wrk)", flush=True)
    tmp = tempfile.mkdtemp(prefix="presup-bench-stem-")
    args.code = os.path.join(tmp, "code")
    os.makedirs(args.code)
    write_code(args.code, "v1")
    # The app's environment, for every server (presup passes its own on to the workers).
    os.environ.update({"STEM_BENCH_CODE": args.code, "STEM_BENCH_ENTRIES": str(args.entries),
                       "PYTHONDONTWRITEBYTECODE": "1"})  # a rewritten module is read anew
    size = app_size_mib(py, args.entries)
    header = [f"presup stem vs gunicorn --preload vs presup exec'd workers, {time.strftime('%Y-%m-%d %H:%M')}"]
    header += bench.machine(py, gunicorn_version)
    header.append(f"app: bench/stem_app.py, {args.entries} entries (a tuple, an int, a str each): "
                  f"{size:.0f} MiB of objects in one process")
    header.append(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("\n".join(header), flush=True)

    servers = [PresupStem(py, tmp), GunicornPreload(py, tmp), PresupExec(py, tmp)]
    results = {s.name: {} for s in servers}
    try:
        for figure, fn, runs, kinds in plan(args, have_wrk):
            chosen = [s for s in servers if kinds is None or type(s) in kinds]
            print(f"  {figure}: {runs} run(s) each", end="", flush=True)
            for _ in range(runs):
                for server in chosen:  # interleaved, so drifting load hits them alike
                    try:
                        out = fn(server, args)
                    finally:
                        server.stop()
                    for k, v in out.items():
                        results[server.name].setdefault(k, []).extend(v if isinstance(v, list) else [v])
                    print(".", end="", flush=True)
            print(flush=True)
    except BaseException:
        print(f"\nlogs of every master: {tmp}", file=sys.stderr)
        raise
    footer = [
        "cells: median (min–max) over n runs; PSS: master and every process below it",
        f"walks: {args.workers} clients each sending GET /walk (every object touched) in a loop",
    ]
    for s in servers:
        if results[s.name].get("walks"):
            footer.append(f"{s.label}: {results[s.name]['walks'][0]} walks in {args.walk:g} s")
        for r in getattr(s, "wrk_details", []):
            footer.append(f"{s.label}, during the HUP: {r['rps']:.0f} req/s, {r['non2xx']} non-2xx, {r['detail']}")
    footer.append(f"load average at end: {os.getloadavg()[0]:.2f}; took {(time.monotonic() - started) / 60:.1f} min")
    if args.keep_logs:
        footer.append(f"logs of every master: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{table(results, servers, args)}\n\n" + "\n".join(footer))


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bench.on_signal)
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        bench.kill_everything_below_me()
