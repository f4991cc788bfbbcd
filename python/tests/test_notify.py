"""presup.notify() and its shorthands, to a real datagram socket standing for the master's."""

import errno
import os
import socket
import struct
import tempfile
import unittest
from unittest import mock

from support import DEADLINE

import presup


class NotifyTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory(prefix="presup-py-test-")
        self.addCleanup(self.tmp.cleanup)
        patcher = mock.patch.dict(os.environ)
        patcher.start()
        self.addCleanup(patcher.stop)
        os.environ.pop("NOTIFY_SOCKET", None)

    def master_socket(self, address):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(address)
        return sock

    def received(self, sock):
        """The next datagram and its sender's pid."""
        sock.settimeout(DEADLINE)
        data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pids = [struct.unpack("iII", d)[0] for _, t, d in ancillary if t == socket.SCM_CREDENTIALS]
        return data, pids

    def test_to_a_path(self):
        path = os.path.join(self.tmp.name, "notify")
        sock = self.master_socket(path)
        os.environ["NOTIFY_SOCKET"] = path
        self.assertIs(presup.notify("READY=1", "STATUS=serving"), True)
        self.assertEqual(self.received(sock), (b"READY=1\nSTATUS=serving", [os.getpid()]))

    def test_to_an_abstract_address(self):
        name = "presup-test-%d-%s" % (os.getpid(), os.urandom(6).hex())
        sock = self.master_socket("\0" + name)
        os.environ["NOTIFY_SOCKET"] = "@" + name
        self.assertIs(presup.ready(), True)
        self.assertEqual(self.received(sock)[0], b"READY=1")
        presup.watchdog()
        self.assertEqual(self.received(sock)[0], b"WATCHDOG=1")
        presup.status("two\nlines")
        self.assertEqual(self.received(sock)[0], b"STATUS=two lines")

    def test_without_notify_socket(self):
        self.assertIs(presup.notify("READY=1"), False)
        os.environ["NOTIFY_SOCKET"] = ""
        self.assertIs(presup.ready(), False)

    def test_a_master_gone_is_a_clear_error(self):
        path = os.path.join(self.tmp.name, "gone")
        os.environ["NOTIFY_SOCKET"] = path
        with self.assertRaises(FileNotFoundError) as raised:
            presup.notify("READY=1")
        self.assertIn("cannot send to NOTIFY_SOCKET=%s" % path, str(raised.exception))
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as closed:
            closed.bind(path)  # the file stays, nobody receives
        with self.assertRaises(OSError) as raised:
            presup.notify("READY=1")
        self.assertEqual(raised.exception.errno, errno.ECONNREFUSED)
        self.assertIn("has the master exited?", str(raised.exception))

    def test_lines_are_checked(self):
        with self.assertRaises(ValueError):
            presup.notify()
        with self.assertRaises(ValueError):
            presup.notify("STATUS=a\nb")
