"""The demo worker: a tiny HTTP server on the listener presup passes as fd 3.

Each response names the worker's slot, pid and generation, so that reloads, restarts and
TTIN/TTOU can be watched with curl. Standard library only. On SIGTERM it finishes the request
in hand, then exits (a graceful stop); SIGQUIT exits at once.
"""

import http.server
import os
import signal
import socket
import sys

SLOT = os.environ.get("PRESUP_WORKER_ID", "?")
GENERATION = os.environ.get("PRESUP_GENERATION", "?")
busy = False
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
    global stopping
    stopping = True
    if not busy:
        sys.exit(0)


def main():
    global busy
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("app.py: no listener passed (run it under presup)")
    listener = socket.socket(fileno=3)
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    signal.signal(signal.SIGTERM, on_term)
    while not stopping:
        conn, addr = listener.accept()
        busy = True
        try:
            server.finish_request(conn, addr)
        except OSError:
            pass
        finally:
            server.shutdown_request(conn)
            busy = False


if __name__ == "__main__":
    main()
