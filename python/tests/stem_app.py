"""The tests' stem: preloads stem_state, does what the test asks of a careless app before
presup.stem() (threads, signal handlers, a blocked mask), then, in each worker, reports what
the worker sees to the test ($TEST_REPORT, a Unix stream socket) and answers every connection
on its first listener with its pid, slot and the state's token.

    FIXTURE_THREADS=N   starts N threads (that never end) before presup.stem()
    FIXTURE_SIGNALS=1   a TERM handler, INT and USR1 ignored, PIPE at SIG_DFL, HUP and USR2
                        blocked, a wakeup fd: none of which a worker may keep
"""

import ctypes
import gc
import json
import os
import random
import signal
import socket
import threading

import stem_state

import presup

AT_FORK_IN_CHILD = [0]
os.register_at_fork(after_in_child=lambda: AT_FORK_IN_CHILD.__setitem__(0, AT_FORK_IN_CHILD[0] + 1))

HOLD = threading.Event()
for i in range(int(os.environ.get("FIXTURE_THREADS", "0"))):
    threading.Thread(target=HOLD.wait, name="fixture-%d" % i).start()

APP_FDS = []
if os.environ.get("FIXTURE_SIGNALS"):
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGHUP, signal.SIGUSR2])
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    APP_FDS = [wake_r, wake_w]

# Set in the C library only, unknown to os.environ (as a C extension's setenv would be): a
# worker must not keep it either.
ctypes.CDLL(None).setenv(b"STEM_C_ONLY", b"1", 1)

# Buffered (stdout is a file or /dev/null): the stem must flush it before it forks, or every
# worker would write it again.
print("the stem imported its app")

worker = presup.stem()
# From here on, in a worker.


def open_fds():
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass  # listdir's own fd, closed by now
    return fds


FDS = open_fds()  # first: before this worker opens anything itself
LIBC = ctypes.CDLL(None, use_errno=True)


def c_environ():
    """The environment as the C library has it (what an exec'd program would get)."""
    environ = ctypes.POINTER(ctypes.c_char_p).in_dll(LIBC, "environ")
    out = {}
    i = 0
    while environ and environ[i] is not None:
        key, _, value = environ[i].decode("utf-8").partition("=")
        out[key] = value
        i += 1
    return out


def dispositions():
    out = {}
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = signal.getsignal(signum)
        if handler is signal.default_int_handler:
            out[str(int(signum))] = "default_int_handler"
        elif handler == signal.SIG_IGN:
            out[str(int(signum))] = "ign"
        elif handler == signal.SIG_DFL:
            out[str(int(signum))] = "dfl"
        else:
            out[str(int(signum))] = "other: %r" % (handler,)
    return out


def pdeathsig():
    value = ctypes.c_int(-1)
    assert LIBC.prctl(2, ctypes.byref(value), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
    return value.value


def missing_listener_error():
    try:
        worker.listener("no-such-listener")
    except KeyError as e:
        return e.args[0]
    return None


report = {
    "pid": os.getpid(),
    "ppid": os.getppid(),
    "pgid": os.getpgrp(),
    "threads": len(os.listdir("/proc/self/task")),
    "pdeathsig": pdeathsig(),
    "fds": FDS,
    "app_fds": APP_FDS,
    "environ": dict(os.environ),
    "c_environ": c_environ(),
    "slot": worker.slot,
    "count": worker.count,
    "generation": worker.generation,
    "primary": worker.primary,
    "names": worker.names,
    "listeners": [
        [s.fileno(), int(s.family), int(s.type), list(s.getsockname())] for s in worker.listeners
    ],
    "inheritable": [os.get_inheritable(s.fileno()) for s in worker.listeners],
    "missing_listener_error": missing_listener_error(),
    "state_token": stem_state.TOKEN,
    "state_built_by": stem_state.BUILT_BY,
    "state_sum": sum(stem_state.TABLE[:10]),
    "at_fork_in_child": AT_FORK_IN_CHILD[0],
    "random": random.getrandbits(64),
    "gc_frozen": gc.get_freeze_count(),
    "dispositions": dispositions(),
    "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "wakeup_fd": signal.set_wakeup_fd(-1),
    "notified": presup.ready(),
}
print("worker", os.getpid(), flush=True)
if os.environ.get("TEST_REPORT"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as out:
        out.connect(os.environ["TEST_REPORT"])
        out.sendall(json.dumps(report).encode("utf-8"))

if worker.listeners:
    listener = worker.listeners[0]
    while True:
        conn, _ = listener.accept()
        with conn:
            answer = {"pid": os.getpid(), "slot": worker.slot, "token": stem_state.TOKEN}
            conn.sendall(json.dumps(answer).encode("utf-8"))
while True:
    signal.pause()
