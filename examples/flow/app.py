"""The web worker of the flow example: forwards each request to the flow singleton.

    GET /?text=hello            -> 200 "HELLO from flow pid 4242 via slot 1 pid 4343"
    GET /?text=hello&seconds=1  -> the same, after one second of simulated inference

A flow that cannot be reached is a 502. Standard library only, on the listener presup passes as
fd 3; with uvicorn the worker command would be `uvicorn main:app --fd 3`.
"""

import http.server
import json
import os
import selectors
import signal
import socket
import sys
import time
import urllib.parse

FLOW_SOCKET = os.environ.get("FLOW_SOCKET", "run/flow.sock")
SLOT = os.environ.get("PRESUP_WORKER_ID", "?")


def ask_flow(text, seconds):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(FLOW_SOCKET)
        s.sendall(json.dumps({"text": text, "seconds": seconds}).encode() + b"\n")
        return json.loads(s.makefile("rb").readline())


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        text = query.get("text", ["hello"])[0]
        seconds = float(query.get("seconds", ["0"])[0])
        try:
            answer = ask_flow(text, seconds)
            via = f"via slot {SLOT} pid {os.getpid()}"
            status, body = 200, f"{answer['result']} from flow pid {answer['pid']} {via}\n"
        except (OSError, ValueError) as e:  # ValueError: flow hung up without an answer
            status, body = 502, f"flow unreachable at {FLOW_SOCKET}: {e}\n"
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format, *args):
        pass


stopping = False


def on_term(signum, frame):
    # Only a flag: the loop below finishes the request in hand, then exits. Raising here
    # could drop a connection accepted a moment before.
    global stopping
    stopping = True


def serve():
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("app.py: no listener passed (run it under presup)")
    listener = socket.socket(fileno=3)
    listener.setblocking(False)  # several workers wait on it: the losers must not block
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    wake_r, wake_w = os.pipe()  # signals wake the select below through this pipe
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_term)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while not stopping:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 512)
                continue
            try:
                conn, address = listener.accept()
            except BlockingIOError:
                continue  # another worker took it
            conn.setblocking(True)
            try:
                server.finish_request(conn, address)
            except OSError:
                pass  # the client went away
            finally:
                server.shutdown_request(conn)


def event(what):
    # The integration tests read these lines to check the order of starts and stops.
    if path := os.environ.get("EXAMPLE_EVENTS"):
        with open(path, "a") as f:
            f.write(f"{time.monotonic_ns()} worker {what} {os.getpid()}\n")


def record_pid():
    # The integration tests name a file here to check that no process outlives them.
    if path := os.environ.get("EXAMPLE_PIDS"):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


if __name__ == "__main__":
    record_pid()
    event("start")
    try:
        serve()
    finally:
        event("stop")
