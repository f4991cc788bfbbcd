"""The benchmark's app for gunicorn: the same responses as bench/worker.py (presup's worker).

    /            "slot ? pid P generation ?" (gunicorn has no slots or generations)
    /sleep?S     the same, after sleeping S seconds (default 1)
    /hold        the same, sent at once; then the connection is held (the worker stays busy)
                 until the client closes it, at most 20 s
"""

import os
import select
import time


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/sleep":
        time.sleep(float(environ.get("QUERY_STRING") or 1))
    body = f"slot ? pid {os.getpid()} generation ?\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    if path == "/hold":
        return hold(body, environ.get("gunicorn.socket"))
    return [body]


def hold(body, sock):
    # A sync worker writes each chunk as it comes: the client has the answer while this waits.
    yield body
    if sock is not None:
        select.select([sock], [], [], 20)
