"""The web worker of the flow example: forwards each request to the flow singleton.

    GET /?text=hello            -> 200 "HELLO from flow pid 4242 via slot 1 pid 4343"
    GET /?text=hello&seconds=1  -> the same, after one second of simulated inference

A flow that cannot be reached is a 502. Standard library only, on the listener presup passes as
fd 3; with uvicorn the worker command would be `uvicorn main:app --fd 3`.
"""

import http.server
import json
import os
import socket
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

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


def serve():
    listener = presup_child.inherited_listener()
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    presup_child.serve(server)


if __name__ == "__main__":
    presup_child.record_pid()
    presup_child.event("worker", "start")
    try:
        serve()
    finally:
        presup_child.event("worker", "stop")
