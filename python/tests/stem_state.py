"""The tests' preloaded state: built once, when the stem imports it. Each import appends
"PID TOKEN" to $IMPORT_LOG, so that a test sees how often (and where) it ran."""

import os
import random

TOKEN = "%016x" % random.getrandbits(64)
BUILT_BY = os.getpid()
TABLE = [i * i for i in range(100000)]

if os.environ.get("IMPORT_LOG"):
    with open(os.environ["IMPORT_LOG"], "a") as f:
        f.write("%d %s\n" % (BUILT_BY, TOKEN))
