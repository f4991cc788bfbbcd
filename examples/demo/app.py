"""The demo worker: a tiny HTTP server on the listener presup passes as fd 3.

Each response names the worker's slot, pid and generation, so that reloads, restarts and
TTIN/TTOU can be watched with curl. Standard library only. On SIGTERM it finishes the request
in hand, then exits (a graceful stop): connections still waiting in the listener's backlog are
served by the other workers, since the socket stays open in the master. SIGQUIT exits at once.
"""

import http.server
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

SLOT = os.environ.get("PRESUP_WORKER_ID", "?")
GENERATION = os.environ.get("PRESUP_GENERATION", "?")


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


def main():
    listener = presup_child.inherited_listener()
    # Handler is looked up here, at call time: bench/worker.py replaces it.
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    presup_child.serve(server)


if __name__ == "__main__":
    main()
