"""A master that the test kills: a child subreaper that starts the tests' stem (through
launch.py, its socket at fd 3), has it fork one worker, prints {"stem": PID, "worker": PID}
on stdout and waits to be killed. Its argv[1] is the stem's environment (JSON)."""

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
env = json.loads(sys.argv[1])
env.update(PRESUP_STEM_FD="3", PRESUP_MASTER_PID=str(os.getpid()))
mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
plan = json.dumps({"fds": {"3": theirs.fileno()}, "pid_vars": []})
stem = subprocess.Popen(
    [sys.executable, os.path.join(HERE, "launch.py"), plan, "--"]
    + [sys.executable, os.path.join(HERE, "stem_app.py")],
    pass_fds=[theirs.fileno()],
    env=env,
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
)
theirs.close()
mine.settimeout(20)
ready = json.loads(mine.recv(65536))
assert ready["type"] == "ready", ready
worker_env = {k: v for k, v in env.items() if k != "PRESUP_STEM_FD"}
worker_env.update(
    PRESUP_WORKER_ID="0", PRESUP_WORKER_COUNT="1", PRESUP_GENERATION="1", PRESUP_PRIMARY="1"
)
request = {
    "v": 1, "type": "fork", "id": 1, "slot": 0, "generation": 1, "env": worker_env, "pid_vars": []
}
mine.send(json.dumps(request).encode("utf-8"))
forked = json.loads(mine.recv(65536))
assert forked["type"] == "forked", forked
print(json.dumps({"stem": stem.pid, "worker": forked["pid"]}), flush=True)
while True:
    signal.pause()
