"""A local mail sink for the scheduler example: it stands in for an email API.

`POST /send` with a JSON email records it; `GET /emails` lists every email received, in
arrival order, each with the tick it reports and the pid of the process that sent it. Like the
HTTP APIs that take one, it honours an `Idempotency-Key` header: a second POST with the same
key sends nothing and gets the first answer; the first email's `repeats` counts such POSTs.

    python3 sink.py --port 8025     # --port 0 picks a free port
    curl 127.0.0.1:8025/emails      # [{"tick": 58842917, "pid": 4242, ...}, ...]

The chosen port is printed as the first line of stdout, and written to --port-file if given.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

lock = threading.Lock()
emails = []
by_key = {}  # Idempotency-Key -> index in emails


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path != "/send":
            return self.reply(404, {"error": "not found"})
        email = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        key = self.headers.get("Idempotency-Key")
        with lock:
            if key in by_key:
                number = by_key[key]
                emails[number]["repeats"] += 1
            else:
                number = len(emails)
                emails.append(dict(email, received=time.time(), repeats=0))
                if key is not None:
                    by_key[key] = number
        self.reply(200, {"id": number + 1})

    def do_GET(self):
        if self.path != "/emails":
            return self.reply(404, {"error": "not found"})
        with lock:
            received = [dict(e) for e in emails]  # a copy: `repeats` may change after
        self.reply(200, received)

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # one line per email would drown the scheduler's own output


def main():
    presup_child.serve_standin(Handler, 8025, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
