"""The same tiny app as examples/demo/app.py, as a WSGI callable for gunicorn."""

import os


def app(environ, start_response):
    body = f"slot ? pid {os.getpid()} generation ?\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
