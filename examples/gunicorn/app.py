"""A WSGI app served by gunicorn inside presup workers (see supervisor.toml beside this file).

Each answer names the presup slot and generation, and the pid of the gunicorn worker that
served it. Standard library only: any WSGI app (Flask, Django) is served the same way.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py: the tests' pid records)

presup_child.record_pid()

SLOT = os.environ.get("PRESUP_WORKER_ID", "?")
GENERATION = os.environ.get("PRESUP_GENERATION", "?")


def app(environ, start_response):
    body = f"slot {SLOT} generation {GENERATION} pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
