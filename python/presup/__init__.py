"""presup's Python client: standard library only.

    import presup
    app = create_app()            # once, in the stem: the preloaded state
    worker = presup.stem()        # the stem serves the master's forks and never returns;
                                  # stem() returns in each worker it forks
    serve(app, worker.listener("http"))
    presup.ready()                # READY=1 to the master, when [workers] ready = "notify"

`stem()` also works without preload (an exec'd worker: it returns at once, reading presup's
variables) and outside presup (`python3 app.py`: slot 0 of 1, with `bind=` for listeners).

Here: `stem` (`_stem.py`: the stem's side of the protocol with the master, and what a forked
worker does before the app runs), `Worker` (`_worker.py`: a worker's slot, generation and
listeners), `notify`, `ready`, `watchdog`, `status` (`_notify.py`: datagrams to
`NOTIFY_SOCKET`).
"""

from ._notify import notify, ready, status, watchdog
from ._stem import stem
from ._worker import Worker

__version__ = "0.1.0"

__all__ = ["Worker", "notify", "ready", "status", "stem", "watchdog"]
