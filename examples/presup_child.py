"""What the examples' Python children share: standard library only.

    serve(server)         a graceful accept loop on the listener presup passed as fd 3
    inherited_listener()  that listener (exits with a message when not run under presup)
    record_pid()          for the integration tests: no process may outlive them
    event(who, what)      for the integration tests: the order of starts and stops
    serve_standin(...)    a local stand-in of an outside service, on a port of its own

An example imports it from its parent folder:

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import presup_child

Importing it also puts the repository's Python client (`import presup`, python/ beside
examples/) on the path, for the stem examples (`[workers] preload = true`); elsewhere, install
that package or copy it beside the example.
"""

import os
import selectors
import signal
import socket
import sys
import time

_CLIENT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
if os.path.isdir(_CLIENT) and _CLIENT not in sys.path:
    sys.path.insert(1, _CLIENT)  # after the examples' folder, before the installed packages


def inherited_listener(hint="run it under presup"):
    """The first listener presup passed (fd 3), or exit with `hint`: the LISTEN_* variables are
    for us only when LISTEN_PID is our pid."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit(f"{os.path.basename(sys.argv[0])}: no listener passed ({hint})")
    return socket.socket(fileno=3)


def serve(server):
    """Serve `server` (an http.server or werkzeug server whose socket is presup's listener) one
    request at a time, until SIGTERM. On TERM it finishes the request in hand, then returns (a
    graceful stop): connections still waiting in the backlog are served by the other workers,
    since the socket stays open in the master. SIGQUIT keeps its default: exit at once."""
    stopping = False

    def on_term(signum, frame):
        # Only a flag: the loop below finishes the request in hand, then returns. Raising here
        # could drop a connection accepted a moment before.
        nonlocal stopping
        stopping = True

    listener = server.socket
    listener.setblocking(False)  # several workers wait on it: the losers must not block
    wake_r, wake_w = os.pipe()  # signals wake the select below through this pipe
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, on_term)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while not stopping:
        for key, _ in sel.select():
            if key.fileobj == wake_r:
                os.read(wake_r, 512)
                continue
            try:
                conn, address = listener.accept()
            except BlockingIOError:
                continue  # another worker took it
            conn.setblocking(True)
            try:
                server.finish_request(conn, address)
            except OSError:
                pass  # the client went away
            finally:
                server.shutdown_request(conn)


def record_pid():
    # The integration tests name a file here to check that no process outlives them.
    if path := os.environ.get("EXAMPLE_PIDS"):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


def event(who, what):
    # The integration tests read these lines to check the order of starts and stops.
    if path := os.environ.get("EXAMPLE_EVENTS"):
        with open(path, "a") as f:
            f.write(f"{time.monotonic_ns()} {who} {what} {os.getpid()}\n")


def serve_standin(handler, default_port, description):
    """Run a stand-in of an outside service on 127.0.0.1 (`--port`, 0 for any) until ^C; print
    the port, and with `--port-file` also write it there atomically."""
    import argparse
    from http.server import ThreadingHTTPServer

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=default_port)
    parser.add_argument("--port-file", help="also write the chosen port here (atomically)")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    port = server.server_address[1]
    print(port, flush=True)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.rename(args.port_file + ".tmp", args.port_file)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
