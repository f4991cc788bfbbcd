"""The web app of the scheduler example: a standard-library HTTP server on fd 3.

It only serves; the scheduler runs beside it as presup's singleton (scheduler.py), not in the
app's startup code, where every worker would run its own. (Code that must live inside the app
can instead run only where PRESUP_PRIMARY is 1: presup gives it to exactly one live worker.)
"""

import http.server
import os
import selectors
import signal
import socket
import sys

SLOT = os.environ.get("PRESUP_WORKER_ID", "?")
GENERATION = os.environ.get("PRESUP_GENERATION", "?")
PRIMARY = os.environ.get("PRESUP_PRIMARY", "?")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"slot {SLOT} pid {os.getpid()} generation {GENERATION} primary {PRIMARY}\n"
        self.send_response(200)
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


def record_pid():
    # The integration tests name a file here to check that no process outlives them.
    if path := os.environ.get("EXAMPLE_PIDS"):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


if __name__ == "__main__":
    record_pid()
    serve()
