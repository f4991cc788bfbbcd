"""What `gc.freeze()` (which presup.stem() calls before its first fork) buys, measured.

    python3 bench/gc_freeze.py [--entries 1300000] [--workers 4]

A stem builds Python objects (records: a dict holding a list, which the collector keeps
tracking; or bench/stem_app.py's tuples of an int and a str, which it stops tracking once it has
seen them), forks the workers as presup.stem() does, and each worker runs one full
garbage collection, as any worker does sooner or later (the collector runs on its own once
enough objects were allocated). Printed: the total PSS of the stem and its workers right after
the fork and after the collections, with the objects frozen (presup's stem) and without
(`gc.unfreeze()` in the worker first: a plain fork, as in an app that forks by itself).

A collection writes to the header of every container object it scans (its gc_refs), so without
the freeze every page holding such an object is copied into every worker that collects; frozen
objects are never scanned. What the workers read still writes reference counts (see
bench/stem.py's walks): the freeze keeps the collector from un-sharing, not reads.
"""

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from preload import pss_kib  # noqa: E402  (bench/preload.py)


def build(shape, entries):
    if shape == "tuples":
        # bench/stem_app.py's: the collector untracks a tuple of atoms once it has seen it.
        return [(i, f"item {i:09d}") for i in range(entries)]
    # Records that stay tracked (a dict holding a list): what an app's own objects look like.
    return [{"id": i, "tags": [i]} for i in range(entries)]


def run(shape, entries, workers, frozen):
    """Forks `workers` children of a process holding `entries` entries; returns the total PSS
    in MiB right after the fork and after one full collection in each worker."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    stem = os.fork()
    if stem == 0:
        data = build(shape, entries)
        gc.collect()
        gc.freeze()  # as presup.stem() does before its first fork
        kids = []
        for _ in range(workers):
            pid = os.fork()
            if pid == 0:
                if not frozen:
                    gc.unfreeze()
                os.read(go_r, 1)  # collect when told
                gc.collect()
                os.write(w, b"c")
                time.sleep(3600)
                os._exit(0)
            kids.append(pid)
        os.write(w, (" ".join(map(str, kids)) + "\n").encode())
        time.sleep(3600)
        del data
        os._exit(0)
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(r, 4096)
    kids = [int(p) for p in line.split()]
    procs = [stem] + kids
    time.sleep(0.5)
    before = sum(pss_kib(p) for p in procs) / 1024
    os.write(go_w, b"g" * workers)
    done = 0
    while done < workers:
        done += len(os.read(r, workers))
    after = sum(pss_kib(p) for p in procs) / 1024
    for p in procs:
        os.kill(p, 9)
    for p in kids:
        try:
            os.waitpid(p, 0)
        except ChildProcessError:
            pass  # the stem's, reparented to init
    os.waitpid(stem, 0)
    for fd in (r, w, go_r, go_w):
        os.close(fd)
    return before, after


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_300_000)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {args.entries} entries, {args.workers} workers")
    print("| objects | gc.freeze() | total PSS after the fork (MiB) | after one gc.collect() in each worker (MiB) |")
    print("|---|---|---|---|")
    for shape in ("records", "tuples"):
        for frozen in (True, False):
            before, after = run(shape, args.entries, args.workers, frozen)
            label = "yes (presup.stem())" if frozen else "no"
            print(f"| {shape} | {label} | {before:.0f} | {after:.0f} |")


if __name__ == "__main__":
    main()
