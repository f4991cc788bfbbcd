"""The web app of the scheduler example: a standard-library HTTP server on fd 3.

It only serves; the scheduler runs beside it as presup's singleton (scheduler.py), not in the
app's startup code, where every worker would run its own. (Code that must live inside the app
can instead run only where PRESUP_PRIMARY is 1: presup gives it to exactly one live worker.)
"""

import http.server
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

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


def serve():
    listener = presup_child.inherited_listener()
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    presup_child.serve(server)


if __name__ == "__main__":
    presup_child.record_pid()
    serve()
