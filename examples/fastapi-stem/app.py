"""A FastAPI app imported once by a stem and served by uvicorn in every worker forked from it;
the email scheduler of ../scheduler/ runs beside them as presup's singleton (seed 001).

Under `uvicorn --workers 4` the scheduler, started from the app's lifespan, ran in every
worker, and every email went out four times. Here the app's lifespan starts nothing of the
kind: the scheduler is a [[singleton]] (../scheduler/scheduler.py, one instance, restarted
when it dies). And with `[workers] preload = true`, FastAPI, pydantic and the routes are
imported once, by the stem; each worker is a fork of it, which builds its own event loop in
`uvicorn.Server.run()`, after `presup.stem()` has returned (an event loop, like any thread,
must not be started in the stem: a fork copies only the thread that forks).

    python3 app.py     # under presup: the stem (never returns there; each worker does)
                       # alone: one worker on 127.0.0.1:8007, for development
    GET /              -> "slot 1 pid 4242 generation 1 primary 0"
"""

import contextlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import presup_child  # noqa: E402  (examples/presup_child.py; also puts python/ on the path)
import presup  # noqa: E402  (the client: python/presup)
import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import PlainTextResponse  # noqa: E402


@contextlib.asynccontextmanager
async def lifespan(app):
    # Runs in each worker, on its event loop. Per-worker setup (a connection pool) goes here;
    # once-only work does not: that is the scheduler singleton, or the on_starting hook.
    presup_child.event("worker", "lifespan")
    yield


app = FastAPI(lifespan=lifespan)
worker = None  # this process's presup.Worker, once stem() has returned in it


@app.get("/", response_class=PlainTextResponse)
async def whoami():
    return (f"slot {worker.slot} pid {os.getpid()} generation {worker.generation} "
            f"primary {int(worker.primary)}\n")


def main():
    global worker
    presup_child.record_pid()  # the stem (the tests check that nothing outlives them)
    presup_child.event("stem", "import")
    # Under presup (preload = true): serve fork requests until the master stops; return in
    # each worker. Alone: return at once, with a listener bound to `bind`.
    worker = presup.stem(bind="127.0.0.1:8007")
    presup_child.record_pid()  # the worker
    presup_child.event("worker", "start")
    # uvicorn on presup's listener (shared by every worker). It catches TERM itself: it stops
    # accepting, finishes the requests in hand, runs the lifespan's end, and exits.
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[worker.listeners[0]])


if __name__ == "__main__":
    main()
