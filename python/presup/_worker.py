"""A worker as the app sees it: its slot, generation and listeners.

Under presup the values come from the worker's environment (the README's "What a child
gets"): PRESUP_WORKER_ID, PRESUP_WORKER_COUNT, PRESUP_GENERATION, PRESUP_PRIMARY, and the
listeners at fds 3, 4, ... by systemd's protocol (LISTEN_FDS, LISTEN_FDNAMES, for this process
only when LISTEN_PID is its pid). Outside presup a worker is slot 0 of 1, generation 1, with
the listeners `bind=` asked for.
"""

import errno
import os
import socket
import stat

# The first listener's fd, by systemd's protocol.
FIRST_FD = 3


class Worker:
    """One worker: `slot` (0..count-1), `count` (the pool's size), `generation` (1, then +1 at
    each reload), `primary` (slot 0: the one worker that runs once-per-pool work), `listeners`
    (socket.socket objects, in LISTEN_FDNAMES order) and their `names`."""

    def __init__(self, slot, count, generation, primary, listeners, names):
        self.slot = slot
        self.count = count
        self.generation = generation
        self.primary = primary
        self.listeners = list(listeners)
        self.names = list(names)

    def listener(self, name):
        """The listener named `name` (the config's `[[listen]] name`); KeyError if none is."""
        for listener_name, sock in zip(self.names, self.listeners):
            if listener_name == name:
                return sock
        if self.names:
            have = "the listeners are " + ", ".join(repr(n) for n in self.names)
        else:
            have = "this worker was given no listener"
        raise KeyError("presup: no listener named %r (%s)" % (name, have))

    def __repr__(self):
        return "presup.Worker(slot=%d, count=%d, generation=%d, primary=%s, names=%r)" % (
            self.slot,
            self.count,
            self.generation,
            self.primary,
            self.names,
        )


def current(bind=None):
    """The Worker of this process: from presup's variables when presup started it, else (run by
    hand) slot 0 of 1 with the listeners of `bind`."""
    if "PRESUP_WORKER_ID" in os.environ:
        return from_environment(os.environ, os.getpid())
    return outside(bind)


def from_environment(env, pid):
    """The Worker that presup's variables in `env` describe, for the process `pid`."""
    slot = _number(env, "PRESUP_WORKER_ID")
    count = _number(env, "PRESUP_WORKER_COUNT")
    generation = _number(env, "PRESUP_GENERATION")
    primary = env.get("PRESUP_PRIMARY")
    if primary not in ("0", "1"):
        raise RuntimeError("presup: PRESUP_PRIMARY=%r is neither 1 nor 0" % primary)
    names = []
    listeners = []
    if env.get("LISTEN_PID") == str(pid):
        count_fds = _number(env, "LISTEN_FDS") if "LISTEN_FDS" in env else 0
        names = env.get("LISTEN_FDNAMES", ":".join(["unknown"] * count_fds)).split(":")
        if len(names) != count_fds:
            raise RuntimeError(
                "presup: LISTEN_FDS=%d but LISTEN_FDNAMES=%r names %d listeners"
                % (count_fds, env.get("LISTEN_FDNAMES"), len(names))
            )
        listeners = [adopt(FIRST_FD + i, "LISTEN_FDS=%d" % count_fds) for i in range(count_fds)]
    return Worker(slot, count, generation, primary == "1", listeners, names)


def outside(bind):
    """Slot 0 of 1, generation 1, primary; `bind` is None (no listener), an address
    ("127.0.0.1:8000", "[::1]:8000", "localhost:0", "unix:/path/to.sock"), a list of them
    (each named by its address) or a dict of names to addresses."""
    if bind is None:
        pairs = []
    elif isinstance(bind, str):
        pairs = [(bind, bind)]
    elif isinstance(bind, dict):
        pairs = list(bind.items())
    else:
        pairs = [(address, address) for address in bind]
    names = [name for name, _ in pairs]
    listeners = []
    try:
        for _, address in pairs:
            listeners.append(bind_address(address))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return Worker(0, 1, 1, True, listeners, names)


def adopt(fd, why):
    """The socket at `fd`, which presup passed (`why` says how the fd is known)."""
    try:
        return socket.socket(fileno=fd)
    except OSError as e:
        what = "is not open" if e.errno == errno.EBADF else "is not a socket"
        raise RuntimeError("presup: %s, but fd %d %s (%s)" % (why, fd, what, e.strerror)) from None


def bind_address(address):
    """A listening socket bound to `address` (see `outside`), as presup's listeners are: TCP
    ones with SO_REUSEADDR and TCP_NODELAY; a stale Unix socket file (nobody accepting) is
    replaced, a live one is an error."""
    if not isinstance(address, str):
        raise TypeError("presup.stem(bind=...): an address is a str, not %r" % (address,))
    if address.startswith("unix:"):
        return _bind_unix(address[len("unix:"):], address)
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError("presup.stem(bind=...): %r is not HOST:PORT or unix:PATH" % address)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(
            host or None, int(port), 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(e.errno, "presup.stem(bind=...): %s: %s" % (address, e.strerror)) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise _bind_error(e, address) from None
    return sock


def _bind_unix(path, address):
    if not path:
        raise ValueError("presup.stem(bind=...): %r names no path" % address)
    _remove_stale_socket(path, address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise _bind_error(e, address) from None
    return sock


def _bind_error(e, address):
    return OSError(e.errno, "presup.stem(bind=...): cannot bind %s: %s" % (address, e.strerror))


def _remove_stale_socket(path, address):
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return  # bind says EADDRINUSE, naming the address
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog says EAGAIN instead of waiting: live
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # a socket file nobody accepts on: left by a process gone
            return
        except BlockingIOError:
            pass
        except OSError:
            return  # bind says why
    text = "presup.stem(bind=...): %s: a process accepts on it already" % address
    raise OSError(errno.EADDRINUSE, text)


def _number(env, name):
    value = env.get(name)
    if value is None:
        raise RuntimeError("presup: %s is not set (presup sets it for every worker)" % name)
    if not (value.isascii() and value.isdigit()):
        raise RuntimeError("presup: %s=%r is not a number" % (name, value))
    return int(value)
