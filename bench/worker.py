"""presup's worker in the benchmark: examples/demo/app.py, unchanged, plus the two routes the
benchmark needs (the same as bench/wsgi_app.py, gunicorn's app):

    /            "slot N pid P generation G" (the demo's answer)
    /sleep?S     the same, after sleeping S seconds (default 1)
    /hold        the same, sent at once; then the connection is held (the worker stays busy)
                 until the client closes it, at most 20 s

Standard library only; one request at a time, like a gunicorn sync worker.
"""

import importlib.util
import os
import select
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("demo_app", os.path.join(ROOT, "examples", "demo", "app.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


class Handler(demo.Handler):
    def do_GET(self):
        path, _, query = self.path.partition("?")
        if path == "/sleep":
            time.sleep(float(query or 1))
        super().do_GET()
        if path == "/hold":
            select.select([self.connection], [], [], 20)


demo.Handler = Handler  # demo.main() looks the handler up at call time

if __name__ == "__main__":
    demo.main()
