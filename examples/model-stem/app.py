"""A model loaded once, by a stem, and read by every worker forked from it (seed 003).

aqueduct's answer to "every web worker loads the model" is gunicorn's `preload_app`: the
model is built in gunicorn's master, and the forked workers share its pages copy-on-write.
presup's stem does the same with any WSGI, ASGI or plain-socket server: with
`[workers] preload = true`, this file runs once; it loads the model (a 200 MB numpy array of
embeddings, made up here: MODEL_MB, default 200), then `presup.stem()` forks the workers from
it. A numpy array's data has no reference counts in it, so reading it never writes its pages:
the workers' copies stay the stem's, one model in memory however many workers read it.

Served by the standard library's http.server, one request at a time per worker (the accept
loop of ../presup_child.py, which finishes the request in hand on TERM): each request is CPU
work in numpy, single-threaded (OPENBLAS_NUM_THREADS=1 in supervisor.toml), so a worker per
core serves as much as threads would, and the stem never has a thread to refuse.

    python3 app.py                  # under presup: the stem; alone: one worker on 127.0.0.1:8008
    GET /predict?i=7                -> "item 7: nearest 21644 (score 138.4), slot 1 pid 4243 ..."
    GET /                           -> "slot 1 pid 4243 generation 1 model pid 4200 ..."
"""

import http.server
import os
import sys
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import presup_child  # noqa: E402  (examples/presup_child.py; also puts python/ on the path)
import presup  # noqa: E402  (the client: python/presup)
import numpy as np  # noqa: E402  (starts OpenBLAS's threads unless OPENBLAS_NUM_THREADS=1)

DIM = 1000  # floats per embedding
MODEL_MB = int(os.environ.get("MODEL_MB", "200"))


def load_model():
    """The embeddings, ITEMS x DIM float64: made up (seeded), where a real service reads its
    weights from a file."""
    started = time.monotonic()
    items = (MODEL_MB * 1_000_000 // 8) // DIM
    model = np.random.default_rng(0).standard_normal((items, DIM))
    model.flags.writeable = False  # shared by every worker: nobody may write it
    seconds = time.monotonic() - started
    print(f"model: {model.nbytes / 1e6:.0f} MB loaded in {seconds:.1f} s by pid {os.getpid()}",
          flush=True)
    presup_child.event("stem", "model")  # the tests count these: one per stem, none per worker
    return model


MODEL = load_model()
MODEL_PID = os.getpid()
worker = None  # this process's presup.Worker, once stem() has returned in it


def predict(i):
    """The item nearest to item i: one pass over the whole model (every page of it read)."""
    scores = MODEL @ MODEL[i]
    scores[i] = -np.inf
    best = int(np.argmax(scores))
    return best, float(scores[best])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        me = f"slot {worker.slot} pid {os.getpid()} generation {worker.generation}"
        if url.path == "/predict":
            query = urllib.parse.parse_qs(url.query)
            try:
                i = int(query.get("i", ["0"])[0])
                best, score = predict(i)
            except (ValueError, IndexError):
                return self.reply(400, f"i: an item from 0 to {len(MODEL) - 1}\n")
            return self.reply(200, f"item {i}: nearest {best} (score {score:.1f}), {me}\n")
        self.reply(200, f"{me} model pid {MODEL_PID} items {len(MODEL)}\n")

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format, *args):
        pass


def main():
    global worker
    presup_child.record_pid()  # the stem (the tests check that nothing outlives them)
    # Under presup (preload = true): serve fork requests until the master stops; return in
    # each worker. Alone: return at once, with a listener bound to `bind`.
    worker = presup.stem(bind="127.0.0.1:8008")
    presup_child.record_pid()  # the worker
    presup_child.event("worker", "start")
    listener = worker.listeners[0]
    server = http.server.HTTPServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    presup_child.serve(server)


if __name__ == "__main__":
    main()
