"""The interactions bot of ../interactions/ (Flask, seed 000), imported once by a stem and
served by waitress in every worker forked from it.

With `[workers] preload = true`, presup runs this file once, as the stem: it imports Flask and
the bot, then `presup.stem()` forks the workers from that process. Each worker starts with
the app already imported (copy-on-write: its pages are the stem's until written), so a worker
that dies is back in milliseconds, where an exec'd one imports Flask again. Threads are the
catch of a fork: only the thread that forks is copied, so a lock another thread holds stays
locked forever in the child. waitress runs its requests on a pool of threads, which it starts
in `serve()`: in each worker, after `stem()` has returned, never in the stem (which refuses to
fork with a second thread running, and says so).

    python3 app.py     # under presup: the stem (never returns there; each worker does)
                       # alone: one worker on 127.0.0.1:8006, for development

The slash commands are still registered once, by the master's on_starting hook
(`python3 ../interactions/app.py register`), before the stem starts.
"""

import importlib.util
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import presup_child  # noqa: E402  (examples/presup_child.py; also puts python/ on the path)
import presup  # noqa: E402  (the client: python/presup)
import waitress  # noqa: E402


def load_bot():
    """../interactions/app.py, unchanged, as the module `interactions_bot`: its Flask app and
    its routes (they read the worker's slot when a request comes, not at import)."""
    path = os.path.join(HERE, "..", "interactions", "app.py")
    spec = importlib.util.spec_from_file_location("interactions_bot", path)
    bot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bot)
    return bot


def main():
    presup_child.record_pid()  # the stem (the tests check that nothing outlives them)
    presup_child.event("stem", "import")
    bot = load_bot()  # Flask, werkzeug, the routes: once, here
    # Under presup (preload = true): serve fork requests until the master stops; return in
    # each worker. Alone: return at once, with a listener bound to `bind`.
    worker = presup.stem(bind="127.0.0.1:8006")
    presup_child.record_pid()  # the worker
    presup_child.event("worker", "start")
    # waitress has no stop signal of its own: SystemExit ends its loop (nothing more is
    # accepted), then it lets its threads finish the requests they run (waiting at most 5 s)
    # and returns.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"worker slot {worker.slot} pid {os.getpid()} generation {worker.generation}",
          flush=True)
    # 4 threads, started here, in the worker. presup's listener is shared by every worker;
    # waitress makes it non-blocking, and a worker that loses the race for a connection
    # simply waits for the next one.
    waitress.serve(bot.app, sockets=[worker.listeners[0]], threads=4, ident="presup-waitress")


if __name__ == "__main__":
    main()
