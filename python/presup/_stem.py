"""The stem: the process that imported the app once and forks one worker per request of the
master (`[workers] preload = true`), and what a forked worker does before the app runs in it.

The protocol with the master (presup issue 15, described in the project's README): JSON
messages, one per packet of the SOCK_SEQPACKET socket at PRESUP_STEM_FD; the master's fork
requests are answered in order, one at a time.

A worker is forked twice so that its parent is the master (a child subreaper), not the stem:

    stem ── os.fork ──> middle ── os.fork ──> worker
      reads the pid       setpgid(worker), writes     setpgid(0, 0); waits for EOF on the
      pipe, reaps the     the worker's pid to the     `gone` pipe, then until its parent is
      middle, answers     pid pipe, os._exit(0)       no longer the middle: the master;
      `forked`                                        PDEATHSIG, getppid() re-checked ...

The middle of the next worker is forked ahead of time, once the last request is answered: it
waits, every signal blocked, for its request on the `request` pipe (and exits at its EOF: the
stem is gone). A request then costs one fork of the app, not two, as in gunicorn's arbiter.

Both forks are `os.fork`, so the app's `os.register_at_fork` hooks run (and Python's own:
`random` reseeds, `threading` and `logging` reset their locks). The stem blocks every signal
around the fork, so that no handler of the app runs in the worker before its dispositions are
reset; the worker then empties its mask. Each worker closes the pipes' fds and the stem's
socket: it keeps only the app's own fds and the listeners (at fds 3, 4, ..., inheritable, as an
exec'd worker has them).
"""

import ctypes
import errno
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time

from . import _worker

# The protocol's version, and the largest message (bytes of UTF-8 JSON) either side sends.
VERSION = 1
MAX_MESSAGE = 131072
# An error text sent to the master is cut to this many characters: a message stays small.
MAX_ERROR = 8192

PR_SET_PDEATHSIG = 1

# What a freshly started Python ignores; SIGINT gets signal.default_int_handler, every other
# catchable signal SIG_DFL.
_IGNORED = {getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)}


def stem(bind=None):
    """Serves the master's fork requests, and returns the Worker in each worker forked.

    Under presup with `[workers] preload = true` (PRESUP_STEM_FD is set), this process is the
    stem: once everything the workers share is loaded, call stem(). It refuses to serve when
    the process runs more than one thread (it tells the master why, prints it and exits 1),
    calls gc.freeze() (the objects loaded so far are never scanned again by the collector, in
    the stem or a worker, so their pages stay shared), tells the master it is ready, then
    forks a worker per request. It never returns in the stem, which ends with exit code 0
    (sys.exit) once the master closes its socket.

    Without PRESUP_STEM_FD it returns at once, in this process: the Worker of an exec'd worker
    (preload = false) from presup's variables, or outside presup slot 0 of 1 with the
    listeners `bind` asks for ("127.0.0.1:8000", "unix:/run/app.sock", a list of addresses or
    a dict of names to addresses; under presup the master's listeners are used instead).

    Raises RuntimeError when PRESUP_STEM_FD is not a number or not a Unix SOCK_SEQPACKET
    socket, or presup's variables are malformed.
    """
    value = os.environ.get("PRESUP_STEM_FD")
    if value is None:
        return _worker.current(bind)
    return _Stem(_stem_socket(value)).serve()


def _stem_socket(value):
    """The stem's socket, the fd PRESUP_STEM_FD names."""
    if not (value.isascii() and value.isdigit()):
        raise RuntimeError(
            "presup.stem(): PRESUP_STEM_FD=%r is not a file descriptor number (presup's master "
            "sets it for the stem it starts with [workers] preload = true)" % value
        )
    fd = int(value)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        what = "is not open" if e.errno == errno.EBADF else "is not a socket"
        raise RuntimeError(
            "presup.stem(): PRESUP_STEM_FD=%d, but fd %d %s (%s)" % (fd, fd, what, e.strerror)
        ) from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
        family = getattr(sock.family, "name", sock.family)
        kind = getattr(sock.type, "name", sock.type)
        sock.detach()  # not ours to close
        raise RuntimeError(
            "presup.stem(): PRESUP_STEM_FD=%d, but fd %d is not the master's Unix SOCK_SEQPACKET "
            "socket (it is %s, %s)" % (fd, fd, family, kind)
        )
    sock.set_inheritable(False)  # programs the stem runs do not get it
    return sock


class _Stem:
    """The stem's side of the protocol, on `sock`."""

    def __init__(self, sock):
        self.sock = sock
        self.master_pid = None
        self.libc = None
        # The middle process of the next worker, forked ahead of time, waiting for a request.
        self.spare = None

    def serve(self):
        """Checks, says ready, then serves requests until EOF; returns only in a worker."""
        threads = _count_threads()
        if threads > 1:
            self.refuse(_threads_text(threads))
        self.master_pid = self.read_master_pid()
        try:
            self.libc = _load_libc()
        except (OSError, AttributeError) as e:
            self.refuse("presup.stem(): cannot load the C library's prctl and clearenv: %s" % e)
        gc.freeze()
        self.answer({"type": "ready", "pid": os.getpid()})
        # The first worker's middle, before the first request.
        made = self.make_spare()
        if not (isinstance(made, _Spare) or isinstance(made, str)):
            return made  # the worker
        self.spare = made if isinstance(made, _Spare) else None
        while True:
            message = self.receive()
            if message is None:
                self.drop_spare()
                sys.exit(0)  # the master closed its end: the stem's work is done
            if message["type"] != "fork":
                _log("ignoring a message of unknown type %r from the master" % message["type"])
                continue
            request = _ForkRequest.parse(message)
            if isinstance(request, str):
                self.broken(request)
            worker = self.fork(request)
            if worker is not None:
                return worker

    def read_master_pid(self):
        value = os.environ.get("PRESUP_MASTER_PID", "")
        if not (value.isascii() and value.isdigit() and int(value) > 0):
            self.refuse(
                "presup.stem(): PRESUP_MASTER_PID=%r is not a pid (presup's master sets it for "
                "the stem)" % value
            )
        return int(value)

    def refuse(self, text):
        """Tells the master the stem cannot serve, prints why and exits 1 at once: os._exit,
        since the threads that are the usual cause would keep the interpreter from exiting."""
        try:
            self.send({"type": "refused", "error": text[:MAX_ERROR]})
        except OSError:
            pass  # the master is gone: stderr still says why
        _write_stderr(text)
        _flush_stdio()
        os._exit(1)

    def broken(self, what):
        """The master sent something this client cannot trust: exit 1, saying what."""
        _log("the master sent %s: exiting" % what)
        self.drop_spare()
        sys.exit(1)

    def drop_spare(self):
        """Ends the spare middle (the EOF of its request pipe) and reaps it."""
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.pipes.close(spare.pipes.req_w, spare.pipes.pid_r)
            _reap(spare.middle)

    def send(self, message):
        body = {"v": VERSION}
        body.update(message)
        self.sock.send(json.dumps(body, separators=(",", ":")).encode("utf-8"))

    def answer(self, message):
        """Sends `message`; a master that cannot be told (gone, broken) ends the stem."""
        try:
            self.send(message)
        except OSError as e:
            _log("cannot send %r to the master (%s): exiting" % (message["type"], e.strerror))
            self.drop_spare()
            sys.exit(1)

    def receive(self):
        """The next message from the master (v and type checked), or None at EOF."""
        try:
            data = self.sock.recv(MAX_MESSAGE + 1)
        except ConnectionResetError:
            return None
        if not data:
            return None
        if len(data) > MAX_MESSAGE:
            self.broken("a message of more than %d bytes" % MAX_MESSAGE)
        try:
            message = json.loads(data.decode("utf-8"))
        except ValueError as e:
            self.broken("a message that is not UTF-8 JSON (%s)" % e)
        if not isinstance(message, dict):
            self.broken("a message that is not a JSON object: %s" % _cut(data))
        version = message.get("v")
        if type(version) is not int or version != VERSION:
            self.broken(
                "a message of protocol version %s, where this client speaks version %d: %s"
                % (json.dumps(version), VERSION, _cut(data))
            )
        if not isinstance(message.get("type"), str):
            self.broken("a message without a type: %s" % _cut(data))
        return message

    def fork(self, request):
        """Forks the worker `request` asks for and answers the master. Returns the Worker in the
        worker, None in the stem."""
        for attempt in (1, 2):
            spare, self.spare = self.spare, None
            if spare is None:
                spare = self.make_spare()
                if not isinstance(spare, _Spare):
                    if isinstance(spare, str):
                        self.answer(_fork_failed(request, spare))
                        return None
                    return spare  # the worker
            try:
                _write_all(spare.pipes.req_w, request.raw)
            except OSError as e:
                # The spare died (killed by someone): reaped, and once more with a new one.
                spare.pipes.close(spare.pipes.req_w, spare.pipes.pid_r)
                _reap(spare.middle)
                if attempt == 2:
                    self.answer(_fork_failed(request, "the middle process: " + _describe(e)))
                    return None
                continue
            spare.pipes.close(spare.pipes.req_w)
            self.answer(_outcome(request, spare.middle, spare.pipes))
            break
        # The next worker's middle, while no request waits.
        made = self.make_spare()
        if isinstance(made, _Spare) or made is None or isinstance(made, str):
            self.spare = made if isinstance(made, _Spare) else None
            return None
        return made  # the worker

    def make_spare(self):
        """Forks the middle process of the next worker: in the stem, a _Spare (or why there is
        none); in the worker the middle forks once its request came, the Worker."""
        try:
            pipes = _Pipes()
        except OSError as e:
            return "pipe: " + _describe(e)
        _flush_stdio()  # or each worker would write the stem's buffered output again
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            middle = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            pipes.close(pipes.pid_r, pipes.pid_w, pipes.gone_r, pipes.gone_w, pipes.req_r, pipes.req_w)
            return "fork: " + _describe(e)
        if middle == 0:
            # Every signal stays blocked here: a TERM to the stem's group leaves it waiting
            # for its request, whose EOF comes when the stem is gone.
            pipes.close(pipes.req_w)
            request = _await_request(pipes.req_r)
            middle = _middle(pipes)  # returns only in the worker
            return self.become_worker(request, middle, pipes)
        pipes.close(pipes.gone_w, pipes.gone_r, pipes.pid_w, pipes.req_r)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        return _Spare(middle, pipes)

    def become_worker(self, request, middle, pipes):
        """The worker's steps, in the protocol's order, before the app runs; a step that fails
        ends the worker with exit code 1, saying why."""
        try:
            pipes.close(pipes.pid_w, pipes.gone_w)
            try:
                os.setpgid(0, 0)
            except OSError:
                pass  # checked below, once the middle has had its turn too
            while os.read(pipes.gone_r, 64):
                pass
            pipes.close(pipes.gone_r)
            _wait_reparented(middle)
            if os.getpgrp() != os.getpid():
                raise RuntimeError("it is not in a process group of its own")
            if self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                code = ctypes.get_errno()
                raise OSError(code, "prctl(PR_SET_PDEATHSIG): %s" % os.strerror(code))
            parent = os.getppid()
            if parent != self.master_pid:
                # The master is already gone: nobody would supervise this worker.
                _log(
                    "worker %d (slot %d): its parent is %d, not the master (PRESUP_MASTER_PID=%d): "
                    "exiting" % (os.getpid(), request.slot, parent, self.master_pid)
                )
                _flush_stdio()
                os._exit(1)
            _reset_signals()
            self.sock.close()
            os.environ.clear()
            self.libc.clearenv()  # and what C code set with setenv, unknown to os.environ
            os.environ.update(request.env)
            for name in request.pid_vars:
                os.environ[name] = str(os.getpid())
            return _worker.from_environment(os.environ, os.getpid())
        except BaseException as e:
            why = _describe(e)
            _log("worker %d (slot %d): cannot start: %s" % (os.getpid(), request.slot, why))
            _flush_stdio()
            os._exit(1)


class _Spare:
    """A middle process forked ahead of time, and its pipes."""

    def __init__(self, middle, pipes):
        self.middle = middle
        self.pipes = pipes


class _Pipes:
    """The three pipes of a fork: `request` (stem -> middle: the fork request, one line),
    `pid` (middle -> stem: the worker's pid, or "!" and why there is none) and `gone` (the
    middle holds its only write end: its EOF tells the worker that the middle is gone)."""

    def __init__(self):
        fds = []
        try:
            for _ in range(3):
                fds.extend(os.pipe())
        except OSError:
            self.close(*fds)
            raise
        self.pid_r, self.pid_w, self.gone_r, self.gone_w, self.req_r, self.req_w = fds

    @staticmethod
    def close(*fds):
        for fd in fds:
            os.close(fd)


def _middle(pipes):
    """The middle process: forks the worker, puts it in a process group of its own, writes its
    pid to the stem and exits at once, so that the worker's parent becomes the master. Returns
    only in the worker: the middle's pid."""
    me = os.getpid()
    try:
        pipes.close(pipes.pid_r)
        worker = os.fork()
    except BaseException as e:
        try:
            os.write(pipes.pid_w, ("!fork: %s\n" % _describe(e)).encode("utf-8", "replace"))
        finally:
            os._exit(1)
    if worker == 0:
        return me
    try:
        pipes.close(pipes.gone_r)
        try:
            os.setpgid(worker, worker)
        except OSError:
            pass  # the worker's own setpgid(0, 0) won (or it is gone: its exit says so)
        os.write(pipes.pid_w, b"%d\n" % worker)
    finally:
        os._exit(0)


def _await_request(fd):
    """In a spare middle: the request the stem writes to `fd`; at EOF (the stem is gone, or
    never sends one), the middle exits."""
    data = b""
    while not data.endswith(b"\n"):
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            os._exit(0)
        data += chunk
    os.close(fd)
    request = _ForkRequest.parse(json.loads(data.decode("utf-8")))
    if isinstance(request, str):
        os._exit(1)
    return request


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _outcome(request, middle, pipes):
    """The answer to `request`, from what the middle wrote to the pid pipe, once the middle has
    been reaped (then the worker's parent is the master)."""
    report = _read_line(pipes.pid_r)
    pipes.close(pipes.pid_r)
    status = _reap(middle)
    if report is not None and report.isdigit():
        return {"type": "forked", "id": request.id, "pid": int(report)}
    if report is not None and report.startswith("!"):
        return _fork_failed(request, report[1:])
    why = "the middle process %d ended (%s) before it reported a worker" % (middle, status)
    return _fork_failed(request, why)


def _wait_reparented(middle):
    """Waits until the worker's parent is no longer `middle`. The EOF on the `gone` pipe comes
    as the middle's files are closed, and the kernel closes an exiting process's files before
    it hands its children to the subreaper: for a moment after the EOF, getppid() is still the
    middle's pid. A pidfd of the middle becomes readable once the hand-over is done."""
    if os.getppid() != middle:
        return
    pidfd = None
    if hasattr(os, "pidfd_open"):  # Python 3.9, Linux 5.3
        try:
            pidfd = os.pidfd_open(middle)
        except OSError:
            pass  # gone (then getppid() says so below), or no pidfd on this kernel
    try:
        # Only while the middle is still the parent is `pidfd` surely the middle's (its pid
        # cannot be reused before the stem reaps it, which follows the hand-over).
        if pidfd is not None and os.getppid() == middle:
            poll = select.poll()  # not select(): the app may hold fds past FD_SETSIZE
            poll.register(pidfd, select.POLLIN)
            poll.poll()
    finally:
        if pidfd is not None:
            os.close(pidfd)
    pause = 0.0001
    while os.getppid() == middle:  # no pidfd: the hand-over is the kernel's next few steps
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


class _ForkRequest:
    """A `fork` message: id, slot, generation, env (the worker's complete environment) and
    pid_vars (variables set to the worker's pid)."""

    def __init__(self, id, slot, generation, env, pid_vars):
        self.id = id
        self.slot = slot
        self.generation = generation
        self.env = env
        self.pid_vars = pid_vars

    @classmethod
    def parse(cls, message):
        """The request, or a text saying what is wrong with it."""
        for field in ("id", "slot", "generation"):
            value = message.get(field)
            if type(value) is not int or value < 0:
                return "a fork request whose %s is not a number: %s" % (field, _cut(message))
        env = message.get("env")
        if not isinstance(env, dict) or not all(_is_variable(k, v) for k, v in env.items()):
            return "a fork request whose env is not an object of variables: %s" % _cut(message)
        pid_vars = message.get("pid_vars", [])
        if not isinstance(pid_vars, list) or not all(_is_variable(n, "") for n in pid_vars):
            return "a fork request whose pid_vars is not a list of names: %s" % _cut(message)
        request = cls(message["id"], message["slot"], message["generation"], env, pid_vars)
        # As the stem passes it on to a spare middle: one line (JSON escapes newlines).
        request.raw = (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")
        return request


def _is_variable(name, value):
    return (
        isinstance(name, str)
        and isinstance(value, str)
        and name != ""
        and "=" not in name
        and "\0" not in name
        and "\0" not in value
    )


def _fork_failed(request, error):
    return {"type": "fork_failed", "id": request.id, "error": error[:MAX_ERROR]}


def _count_threads():
    """The process's OS threads (a C library's too), from /proc."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()  # no /proc: the Python threads at least


def _threads_text(count):
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        which = "Python threads besides the main one: " + ", ".join(repr(n) for n in others)
    else:
        which = "none is a Python thread: a C library's thread pool (numpy's OpenBLAS, say)"
    return (
        "presup.stem(): the stem runs %d threads and forks only with one: fork copies only the "
        "calling thread, so a lock another thread holds stays locked forever in every worker. "
        "Start threads after presup.stem() returns (in the worker); for numpy/OpenBLAS set "
        "OPENBLAS_NUM_THREADS=1 (and OMP_NUM_THREADS=1, MKL_NUM_THREADS=1) in [workers] env. "
        "%s." % (count, which)
    )


def _load_libc():
    libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl.restype = ctypes.c_int
    libc.clearenv.argtypes = []
    libc.clearenv.restype = ctypes.c_int
    return libc


def _reset_signals():
    """Dispositions as a freshly started Python has them, no wakeup fd, an empty mask."""
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        if signum == signal.SIGINT:
            handler = signal.default_int_handler
        elif signum in _IGNORED:
            handler = signal.SIG_IGN
        else:
            handler = signal.SIG_DFL
        try:
            signal.signal(signum, handler)
        except (OSError, ValueError):
            pass  # one the C library keeps for itself
    signal.set_wakeup_fd(-1)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _read_line(fd):
    """The line the middle writes to `fd`, or None if it ended before writing one."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 512)
        if not chunk:
            return None
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _reap(pid):
    """Waits for `pid` (the stem's middle); returns how it ended, in words."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "reaped by someone else"  # SIGCHLD ignored by the app, say
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "exit code %d" % os.WEXITSTATUS(status)


def _describe(e):
    if isinstance(e, OSError) and e.errno is not None:
        return "[%s] %s" % (errno.errorcode.get(e.errno, e.errno), e.strerror)
    return "%s: %s" % (type(e).__name__, e)


def _cut(data, limit=200):
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else json.dumps(data)
    return text if len(text) <= limit else text[:limit] + "..."


def _log(text):
    _write_stderr("presup.stem(): " + text)


def _write_stderr(text):
    if sys.stderr is not None:
        try:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def _flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass
