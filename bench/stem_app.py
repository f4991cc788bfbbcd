"""bench/stem.py's app: a WSGI app holding about 200 MB of Python objects, built at import.

    /        "pid P version V"      V: the code version, from the module $STEM_BENCH_CODE/stem_bench_code.py
    /walk    touches every object (a read of each one writes its reference count: the pages
             of a preloaded app are then copied into the worker, copy-on-write)
    /hold    the / answer, sent at once; then the connection is held (the worker stays busy)
             until the client closes it, at most 20 s

The same file for each server measured, one request at a time per worker:
- gunicorn: `gunicorn --preload -w N stem_app:app` (sync workers; with --preload the import,
  and so the objects, happen once in gunicorn's master);
- presup: `python3 stem_app.py` as `[workers] command`, served by the standard library's
  wsgiref on presup's listener (with examples/presup_child.py's accept loop, which finishes the
  request in hand on TERM). With `preload = true` it is the stem: the import happens once and
  `presup.stem()` forks the workers; with `preload = false` every worker runs it, and builds
  its own objects. Either way the worker says READY=1 (`ready = "notify"`) once it serves.
STEM_BENCH_ENTRIES (default 1300000) sets the size: about 160 bytes of objects per entry.
"""

import os
import select
import sys

sys.path.insert(0, os.environ.get("STEM_BENCH_CODE", "."))
import stem_bench_code  # noqa: E402  (VERSION: rewritten by bench/stem.py before a HUP)

ENTRIES = int(os.environ.get("STEM_BENCH_ENTRIES", "1300000"))
# One tuple, one int and one str per entry: three objects, each with its reference count.
DATA = [(i, f"item {i:09d}") for i in range(ENTRIES)]
VERSION = stem_bench_code.VERSION


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    body = f"pid {os.getpid()} version {VERSION}"
    if path == "/walk":
        body += f" walked {sum(len(text) for _, text in DATA)}"
    body = (body + "\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    if path == "/hold":
        return hold(body, environ.get("gunicorn.socket") or environ.get("bench.socket"))
    return [body]


def hold(body, sock):
    # Both servers write each chunk as it comes: the client has the answer while this waits.
    yield body
    if sock is not None:
        select.select([sock], [], [], 20)


def serve(listener):
    """wsgiref's server on presup's listener, one request at a time, with examples/
    presup_child.py's accept loop: on TERM it finishes the request in hand, then exits, as a
    gunicorn sync worker does (a reload then loses no request)."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    import presup_child

    class Handler(WSGIRequestHandler):
        def get_environ(self):
            environ = super().get_environ()
            environ["bench.socket"] = self.connection  # for /hold
            return environ

        def log_message(self, format, *args):
            pass

    server = WSGIServer(listener.getsockname(), Handler, bind_and_activate=False)
    server.socket = listener
    # What server_bind() would have set (without a DNS lookup of the address).
    server.server_name, server.server_port = listener.getsockname()[:2]
    server.setup_environ()
    server.set_app(app)
    presup_child.serve(server)


if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "examples"))  # presup_child (which adds python/)
    import wsgiref.simple_server  # noqa: F401  (imported here, before the fork, as gunicorn's are)

    import presup_child  # noqa: F401, I001  (first: it puts python/ on the path)
    import presup

    worker = presup.stem()  # stem: forks the workers, never returns; exec'd: returns at once
    presup.ready()  # [workers] ready = "notify": up once the objects are built
    serve(worker.listeners[0])
