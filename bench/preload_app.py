"""gunicorn's side of bench/preload.py: a WSGI app holding a table comparable to
examples/preload.rs's, built at import (so once, in the master, with --preload).

The table is an array('Q') of PRELOAD_MB megabytes (one object: reading it touches no
refcount on its pages, the friendliest case for copy-on-write in CPython), served as
/lookup/N.
"""

import os
from array import array

MB = int(os.environ.get("PRELOAD_MB", "256"))
TABLE = array("Q", range((MB << 20) // 8))


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path.startswith("/lookup/"):
        try:
            body = f"{TABLE[int(path[8:])]}\n".encode()
            status = "200 OK"
        except (ValueError, IndexError):
            body, status = b"no such entry\n", "404 Not Found"
    else:
        body, status = f"pid {os.getpid()} entries {len(TABLE)}\n".encode(), "200 OK"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
