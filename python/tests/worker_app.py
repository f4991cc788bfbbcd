"""The tests' exec'd worker (no preload): prints what presup.stem() returns, as JSON."""

import json
import os

import presup

worker = presup.stem(bind="127.0.0.1:0")  # ignored under presup: the master's listeners win
print(json.dumps({
    "pid": os.getpid(),
    "slot": worker.slot,
    "count": worker.count,
    "generation": worker.generation,
    "primary": worker.primary,
    "names": worker.names,
    "listeners": [
        [s.fileno(), int(s.family), int(s.type), s.getsockname()] for s in worker.listeners
    ],
}))
