"""A local stand-in for the Discord API's command registration (seed 000).

It accepts `PUT /api/v10/applications/<id>/commands` like Discord and, like Discord's rate
limit, answers 429 to a second registration within a minute, so a supervisor that registers
once per worker is caught in the act. `GET /count` tells what it saw.

    python3 discord_standin.py --port 8081     # --port 0 picks a free port
    curl 127.0.0.1:8081/count                  # {"registrations": 1, "rejected": 0}

The chosen port is printed as the first line of stdout, and written to --port-file if given.
"""

import json
import math
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

WINDOW = 60.0  # seconds after a registration during which another one gets 429
COMMANDS_PATH = re.compile(r"/api/v\d+/applications/(\d+)/commands")

lock = threading.Lock()
registrations = 0
rejected = 0
last = None  # time.monotonic() of the last accepted registration


class Handler(BaseHTTPRequestHandler):
    def do_PUT(self):
        global registrations, rejected, last
        found = COMMANDS_PATH.fullmatch(self.path)
        if not found:
            return self.reply(404, {"message": "404: Not Found", "code": 0})
        if not re.fullmatch(r"Bot \S+", self.headers.get("Authorization", "")):
            return self.reply(401, {"message": "401: Unauthorized", "code": 0})
        commands = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with lock:
            now = time.monotonic()
            wait = 0.0 if last is None else WINDOW - (now - last)
            if wait > 0:
                rejected += 1
            else:
                registrations += 1
                last = now
        if wait > 0:
            body = {"message": "You are being rate limited.", "retry_after": round(wait, 3),
                    "global": False}
            return self.reply(429, body, {"Retry-After": str(math.ceil(wait))})
        app_id = found.group(1)
        self.reply(200, [dict(c, id=str(i + 1), application_id=app_id)
                         for i, c in enumerate(commands)])

    def do_GET(self):
        if self.path != "/count":
            return self.reply(404, {"message": "404: Not Found", "code": 0})
        with lock:
            counts = {"registrations": registrations, "rejected": rejected}
        self.reply(200, counts)

    def reply(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def main():
    presup_child.serve_standin(Handler, 8081, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
