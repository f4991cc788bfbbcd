"""Notifications to the master: systemd's sd_notify protocol, one datagram to NOTIFY_SOCKET.

The master tells a datagram's sender by its credentials (the kernel's, not the text), so a
worker sends from its own process: a socket made for each call, never one inherited.
"""

import os
import socket


def notify(*lines):
    """Sends `lines` ("READY=1", "STATUS=...") as one datagram to `NOTIFY_SOCKET`, a path or an
    abstract address ("@name"). Returns True once sent, False when there is no NOTIFY_SOCKET
    (outside presup, or a master without one). Raises OSError naming the socket when it
    cannot be sent (the master is gone), ValueError for no line or a line with a newline."""
    if not lines:
        raise ValueError("presup.notify() needs at least one line, such as 'READY=1'")
    for line in lines:
        if not isinstance(line, str):
            raise TypeError("presup.notify(): each line is a str, not %s" % type(line).__name__)
        if "\n" in line:
            raise ValueError("presup.notify(): a line holds a newline: %r" % line)
    name = os.environ.get("NOTIFY_SOCKET", "")
    if not name:
        return False
    address = "\0" + name[1:] if name.startswith("@") else name
    data = "\n".join(lines).encode("utf-8")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(data, os.fsencode(address))
        except OSError as e:
            raise OSError(
                e.errno,
                "presup.notify(): cannot send to NOTIFY_SOCKET=%s: %s (has the master exited?)"
                % (name, e.strerror),
            ) from None
    return True


def ready():
    """READY=1: the worker serves (for `[workers] ready = "notify"`)."""
    return notify("READY=1")


def watchdog():
    """WATCHDOG=1: the worker is alive (for `[workers] watchdog`)."""
    return notify("WATCHDOG=1")


def status(text):
    """STATUS=text, the worker's status line; newlines in `text` become spaces."""
    return notify("STATUS=" + " ".join(str(text).splitlines()))
