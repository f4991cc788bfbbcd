"""The model-serving singleton of the flow example (seed 003): one process holds the model,
every worker reaches it over a Unix socket.

aqueduct starts this process from gunicorn's `on_starting` and SIGKILLs it in `on_exit`; a
master killed with SIGKILL leaves it running. presup runs it as a [[singleton]] instead: ready
(accepting on its socket) before any worker starts, stopped only after the last worker has
exited, and killed by the kernel if the master itself is SIGKILLed.

Protocol: one JSON line in, `{"text": "...", "seconds": 0.0}`, one JSON line out,
`{"result": "...", "pid": ...}`; `seconds` is simulated inference time.
On SIGTERM it stops accepting, finishes the requests in hand, removes its socket and exits.
"""

import json
import os
import signal
import socketserver
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

SOCKET = os.environ.get("FLOW_SOCKET", "run/flow.sock")  # relative to the working directory
LOAD_SECONDS = 0.5  # "loading the model": the workers must not be started before it is done


class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        if not line:  # presup's readiness probe connects and hangs up
            return
        request = json.loads(line)
        event("request")
        time.sleep(float(request.get("seconds", 0)))  # the model at work
        answer = {"result": request.get("text", "").upper(), "pid": os.getpid()}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    pass  # one thread per connection; server_close() waits for them


def event(what):
    presup_child.event("flow", what)


def main():
    event("start")
    time.sleep(LOAD_SECONDS)
    os.makedirs(os.path.dirname(SOCKET) or ".", exist_ok=True)
    if os.path.exists(SOCKET):  # left by a predecessor that was SIGKILLed
        os.unlink(SOCKET)
    server = Server(SOCKET, Handler)
    event("ready")

    def on_term(signum, frame):
        event("term")
        # shutdown() waits for serve_forever() to return: call it from another thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    server.serve_forever(poll_interval=0.1)
    server.server_close()  # waits for the requests in hand
    os.unlink(SOCKET)
    event("stop")


if __name__ == "__main__":
    presup_child.record_pid()
    main()
