"""What the tests share: the master's part, played by the test process itself.

The test process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER), as presup's master is,
so that a worker whose middle process has exited becomes its child. `Master` holds the
master's end of a stem's socketpair and starts the stem through `launch.py`, which puts the
listeners and the socket at the fd numbers the master uses (3, 4, ...) and execs the stem.

Every wait has a deadline (DEADLINE) and is event-driven: a socket polled, a pidfd polled (a
child's exit). Each test ends with every process it started reaped (`ProcessTestCase`), and
checks that the test process has no child left.
"""

import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import presup

DEADLINE = 20.0
HERE = os.path.dirname(os.path.abspath(__file__))
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def become_subreaper():
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def fixture(name):
    return os.path.join(HERE, name)


def base_env(**extra):
    """The environment of the tests' children: enough to run Python and import presup (the
    copy the tests import), the suite's mark (tests/python.rs: nothing may outlive the suite)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(presup.__file__))),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if "PRESUP_TEST_MARK" in os.environ:
        env["PRESUP_TEST_MARK"] = os.environ["PRESUP_TEST_MARK"]
    env.update(extra)
    return env


def wait_exit(pid, timeout=DEADLINE):
    """Waits for the child `pid` to end and reaps it; returns its wait status. Fails the test
    at the deadline (the caller's cleanup kills it)."""
    end = time.monotonic() + timeout
    if hasattr(os, "pidfd_open"):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None  # already reaped: waitpid says so
        if fd is not None:
            try:
                if not select.select([fd], [], [], timeout)[0]:
                    raise AssertionError("pid %d did not exit within %ss" % (pid, timeout))
            finally:
                os.close(fd)
        return os.waitpid(pid, 0)[1]
    pause = 0.001  # no pidfd (Python 3.8): poll, with the same deadline
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= end:
            raise AssertionError("pid %d did not exit within %ss" % (pid, timeout))
        time.sleep(pause)
        pause = min(pause * 2, 0.025)


def kill_and_reap(pid):
    """SIGKILLs the child `pid` if it is still there, with its process group as the master
    would (a stem's spare middle process is in it), and reaps them (a cleanup)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass  # not a group's leader
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    try:
        wait_exit(pid)
    except ChildProcessError:
        pass  # not ours (yet): the leftover check says so
    # What of its group was reparented to this subreaper once it was gone.
    while True:
        try:
            os.waitpid(-pid, 0)
        except ChildProcessError:
            break


def children():
    """The test process's children, zombies included, from /proc."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.append(int(entry))
    return found


def status_field(pid, name):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    raise KeyError(name)


def exit_code(status):
    """A wait status as subprocess says it: the exit code, or -N for signal N."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def recv_within(sock, size=65536, timeout=DEADLINE):
    """One recv on `sock`, waiting at most `timeout`; fails the test at the deadline."""
    if not select.select([sock], [], [], timeout)[0]:
        raise AssertionError("nothing arrived within %ss" % timeout)
    return sock.recv(size)


def read_within(fd, size=65536, timeout=DEADLINE):
    """One read of `fd` (a pipe), waiting at most `timeout`; fails the test at the deadline."""
    if not select.select([fd], [], [], timeout)[0]:
        raise AssertionError("nothing arrived within %ss" % timeout)
    return os.read(fd, size)


class ProcessTestCase(unittest.TestCase):
    """A test that starts processes: each is reaped at the end, and none may be left."""

    def setUp(self):
        become_subreaper()
        self.addCleanup(self.check_no_children)
        self.tmp = tempfile.TemporaryDirectory(prefix="presup-py-test-")
        self.addCleanup(self.tmp.cleanup)
        self.dir = self.tmp.name

    def path(self, name):
        return os.path.join(self.dir, name)

    def track(self, pid):
        """`pid` is killed and reaped when the test ends, however it ends."""
        self.addCleanup(kill_and_reap, pid)

    def check_no_children(self):
        left = children()
        for pid in left:
            kill_and_reap(pid)
        self.assertEqual(left, [], "processes outlived the test")

    def spawn(self, argv, fds=None, env=None, pid_vars=(), stderr_name="stderr", stdout=None):
        """Starts `argv` with `fds` ({target fd: socket or fd}) at their numbers and `env`
        (`pid_vars` set to the child's pid, as LISTEN_PID is), its stderr in a file of the
        test's dir. The child is killed and reaped when the test ends."""
        fds = {int(k): (v if isinstance(v, int) else v.fileno()) for k, v in (fds or {}).items()}
        plan = {"fds": {str(k): v for k, v in fds.items()}, "pid_vars": list(pid_vars)}
        stderr = open(self.path(stderr_name), "wb")
        try:
            proc = subprocess.Popen(
                [sys.executable, fixture("launch.py"), json.dumps(plan), "--"] + list(argv),
                pass_fds=sorted(set(fds.values())),
                env=env if env is not None else base_env(),
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.DEVNULL,
                stderr=stderr,
            )
        finally:
            stderr.close()
        self.addCleanup(self.stop_process, proc)
        return proc

    def stop_process(self, proc):
        if proc.poll() is None:
            # With its process group, as the master does: a stem's spare middle is in it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.kill()
            proc.wait(DEADLINE)
        # What of its group was reparented to this subreaper once it was gone.
        while True:
            try:
                os.waitpid(-proc.pid, 0)
            except ChildProcessError:
                break
        for pipe in (proc.stdout, proc.stdin):
            if pipe is not None:
                pipe.close()

    def read(self, name):
        try:
            with open(self.path(name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class Master:
    """The master's side of one stem: its end of the socketpair, the stem process, the
    workers forked (each killed and reaped when the test ends)."""

    def __init__(self, test, listeners=(), names=None, env=None, argv=None, stdout=None):
        self.test = test
        self.sock, stem_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        test.addCleanup(self.sock.close)
        fds = {3 + i: sock for i, sock in enumerate(listeners)}
        self.stem_fd = 3 + len(listeners)
        fds[self.stem_fd] = stem_end
        stem_env = base_env(PRESUP_STEM_FD=str(self.stem_fd), PRESUP_MASTER_PID=str(os.getpid()))
        pid_vars = []
        if listeners:
            names = names or ["l%d" % i for i in range(len(listeners))]
            stem_env.update(LISTEN_FDS=str(len(listeners)), LISTEN_FDNAMES=":".join(names))
            pid_vars = ["LISTEN_PID"]
        stem_env.update(env or {})
        argv = argv or [sys.executable, fixture("stem_app.py")]
        self.proc = test.spawn(argv, fds, stem_env, pid_vars, stdout=stdout)
        stem_end.close()
        self.workers = []

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        return self.test.read("stderr")

    def send(self, message):
        self.sock.send(json.dumps(message).encode("utf-8"))

    def recv(self, timeout=DEADLINE):
        """The stem's next message; fails the test at EOF or the deadline, showing its stderr."""
        try:
            data = recv_within(self.sock, 200000, timeout)
        except AssertionError:
            text = "no message from the stem; its stderr:\n" + self.stderr()
            raise AssertionError(text) from None
        if not data:
            raise AssertionError("the stem closed its socket; its stderr:\n" + self.stderr())
        return json.loads(data.decode("utf-8"))

    def expect_ready(self):
        message = self.recv()
        self.test.assertEqual(message, {"v": 1, "type": "ready", "pid": self.pid})

    def fork(self, id, env, slot=0, generation=1, pid_vars=("LISTEN_PID", "WATCHDOG_PID")):
        """Asks for a worker; returns its pid from the `forked` answer."""
        self.send(
            {"v": 1, "type": "fork", "id": id, "slot": slot, "generation": generation,
             "env": env, "pid_vars": list(pid_vars)}
        )
        answer = self.recv()
        self.test.assertEqual(answer.get("type"), "forked", answer)
        self.test.assertEqual(answer["id"], id)
        self.test.assertEqual(sorted(answer), ["id", "pid", "type", "v"])
        pid = answer["pid"]
        self.test.track(pid)
        self.workers.append(pid)
        return pid

    def wait(self):
        """The stem's exit code, once it has exited."""
        return self.proc.wait(DEADLINE)
