"""The demo worker: a tiny HTTP server on the listener presup passes as fd 3.

Each response names the worker's slot, pid and generation, so that reloads, restarts and
TTIN/TTOU can be watched with curl. Standard library only. On SIGTERM it finishes the request
in hand, then exits (a graceful stop): connections still waiting in the listener's backlog are
served by the other workers, since the socket stays open in the master. SIGQUIT exits at once.
"""

import http.server
import os
import selectors
import signal
import socket
import sys

SLOT = os.environ.get("PRESUP_WORKER_ID", "?")
GENERATION = os.environ.get("PRESUP_GENERATION", "?")
stopping = False


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        body = f"slot {SLOT} pid {os.getpid()} generation {GENERATION}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


def on_term(signum, frame):
    # Only a flag: the loop below finishes the request in hand, then exits. Raising here
    # could drop a connection accepted a moment before.
    global stopping
    stopping = True


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("app.py: no listener passed (run it under presup)")
    listener = socket.socket(fileno=3)
    listener.setblocking(False)
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    # Signals wake the select below through this pipe.
    wake_r, wake_w = os.pipe()
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
                conn, addr = listener.accept()
            except BlockingIOError:
                continue  # another worker took it
            conn.setblocking(True)
            try:
                server.finish_request(conn, addr)
            except OSError:
                pass
            finally:
                server.shutdown_request(conn)


if __name__ == "__main__":
    main()
