"""A local stand-in for Discord's gateway, for the sharded-bot example (seed 002).

It checks what the real gateway checks of IDENTIFY: at most one per `--interval` per bucket
(`bucket = shard % --buckets`, Discord's max_concurrency) and at most `--daily-limit` per
`--daily-period`. An IDENTIFY that breaks either rule is answered INVALID_SESSION (Discord's
op 9) and counted as a violation; a good one is answered READY and its connection is the
shard's session until it closes. Time is measured on arrival, so `--slack` allows for the
jitter between the moment a shard is allowed to identify and the moment its IDENTIFY arrives.

A line protocol instead of a websocket, to stay in the standard library:

    IDENTIFY <shard> <shard_count>   ->  READY <session> | INVALID_SESSION
    STATS                            ->  {"identifies": N, "violations": N, "live": [shards]}

    python3 gateway.py --port 8090 [--port-file F] [--interval 1] [--buckets 2] [--slack 0.1]
    python3 gateway.py --port 8090 --stats     # asks a running gateway for its STATS line
"""

import argparse
import collections
import json
import os
import socketserver
import threading
import time

lock = threading.Lock()
last = {}  # bucket -> arrival of its last accepted IDENTIFY
accepted = collections.deque()  # arrivals of accepted IDENTIFYs, for the daily limit
live = {}  # shard -> session number
stats = {"identifies": 0, "violations": 0}


class Shard(socketserver.StreamRequestHandler):
    def handle(self):
        shard = None
        for line in self.rfile:
            words = line.decode().split()
            if words == ["STATS"]:
                with lock:
                    answer = dict(stats, live=sorted(live))
                self.wfile.write((json.dumps(answer) + "\n").encode())
            elif len(words) == 3 and words[0] == "IDENTIFY":
                shard = int(words[1])
                self.wfile.write((identify(shard, id(self)) + "\n").encode())
        with lock:
            if shard is not None and live.get(shard) == id(self):
                del live[shard]

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass


def identify(shard, session):
    now = time.monotonic()
    bucket = shard % ARGS.buckets
    with lock:
        stats["identifies"] += 1
        while accepted and accepted[0] <= now - ARGS.daily_period:
            accepted.popleft()
        too_soon = bucket in last and now - last[bucket] < ARGS.interval - ARGS.slack
        over_budget = len(accepted) >= ARGS.daily_limit
        if too_soon or over_budget:
            stats["violations"] += 1
            why = "too soon after the last in its bucket" if too_soon else "daily limit"
            print(f"gateway: shard {shard} bucket {bucket}: INVALID_SESSION ({why})", flush=True)
            return "INVALID_SESSION"
        last[bucket] = now
        accepted.append(now)
        live[shard] = session
        return f"READY {stats['identifies']}"


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--port-file")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--buckets", type=int, default=2)
    p.add_argument("--slack", type=float, default=0.1)
    p.add_argument("--daily-limit", type=int, default=1000)
    p.add_argument("--daily-period", type=float, default=86400.0)
    p.add_argument("--stats", action="store_true", help="print a running gateway's STATS")
    ARGS = p.parse_args()
    if ARGS.stats:
        import socket

        with socket.create_connection(("127.0.0.1", ARGS.port), timeout=10) as s:
            s.sendall(b"STATS\n")
            print(s.makefile().readline().strip())
        return
    server = Server(("127.0.0.1", ARGS.port), Shard)
    if ARGS.port_file:
        with open(ARGS.port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(ARGS.port_file + ".tmp", ARGS.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
