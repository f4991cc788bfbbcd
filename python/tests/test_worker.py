"""presup.stem() without PRESUP_STEM_FD: an exec'd worker (preload = false), in a real child
started as the master starts one, and outside presup, in the test process itself."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import support
from support import DEADLINE, base_env, fixture

import presup


class ExecdWorkerTest(support.ProcessTestCase):
    def setUp(self):
        super().setUp()
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.tcp.close)
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(4)
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.unix.close)
        self.unix.bind(self.path("admin.sock"))
        self.unix.listen(4)

    def run_worker(self, env, pid_vars=("LISTEN_PID",)):
        """worker_app.py with the two listeners at fds 3 and 4: its exit code and report."""
        proc = self.spawn(
            [sys.executable, fixture("worker_app.py")], {3: self.tcp, 4: self.unix}, env, pid_vars,
            stdout=subprocess.PIPE,
        )
        out, _ = proc.communicate(timeout=DEADLINE)
        return proc.returncode, (json.loads(out) if proc.returncode == 0 else None)

    def env(self, **extra):
        env = base_env(
            PRESUP_WORKER_ID="1",
            PRESUP_WORKER_COUNT="4",
            PRESUP_GENERATION="3",
            PRESUP_PRIMARY="0",
            PRESUP_MASTER_PID=str(os.getpid()),
            LISTEN_FDS="2",
            LISTEN_FDNAMES="http:admin",
        )
        env.update(extra)
        return env

    def test_from_presups_variables_and_listeners(self):
        code, report = self.run_worker(self.env())
        self.assertEqual(code, 0, self.read("stderr"))
        self.assertEqual(
            (report["slot"], report["count"], report["generation"], report["primary"]),
            (1, 4, 3, False),
        )
        self.assertEqual(report["names"], ["http", "admin"])
        self.assertEqual(
            report["listeners"],
            [
                [3, socket.AF_INET, socket.SOCK_STREAM, list(self.tcp.getsockname())],
                [4, socket.AF_UNIX, socket.SOCK_STREAM, self.path("admin.sock")],
            ],
        )

    def test_listeners_of_another_process_are_not_taken(self):
        code, report = self.run_worker(self.env(LISTEN_PID="1"), pid_vars=())
        self.assertEqual(code, 0, self.read("stderr"))
        self.assertEqual((report["names"], report["listeners"]), ([], []))

    def test_unnamed_listeners_are_unknown(self):
        env = self.env()
        del env["LISTEN_FDNAMES"]
        code, report = self.run_worker(env)
        self.assertEqual(code, 0, self.read("stderr"))
        self.assertEqual(report["names"], ["unknown", "unknown"])

    def test_a_malformed_variable_is_a_clear_error(self):
        code, _ = self.run_worker(self.env(PRESUP_WORKER_COUNT="four"))
        self.assertEqual(code, 1)
        self.assertIn(
            "RuntimeError: presup: PRESUP_WORKER_COUNT='four' is not a number", self.read("stderr")
        )

    def test_a_listener_that_is_not_there_is_a_clear_error(self):
        code, _ = self.run_worker(self.env(LISTEN_FDS="3", LISTEN_FDNAMES="http:admin:metrics"))
        self.assertEqual(code, 1)
        self.assertIn(
            "RuntimeError: presup: LISTEN_FDS=3, but fd 5 is not open", self.read("stderr")
        )


class OutsidePresupTest(unittest.TestCase):
    """In the test process, with an environment that has none of presup's variables."""

    def setUp(self):
        patcher = mock.patch.dict(os.environ, {"PATH": os.environ.get("PATH", "")}, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)

    def stem(self, bind):
        worker = presup.stem(bind=bind)
        for sock in worker.listeners:
            self.addCleanup(sock.close)
        return worker

    def test_slot_0_of_1_without_listeners(self):
        worker = self.stem(None)
        self.assertEqual(
            (worker.slot, worker.count, worker.generation, worker.primary), (0, 1, 1, True)
        )
        self.assertEqual((worker.listeners, worker.names), ([], []))
        with self.assertRaises(KeyError) as raised:
            worker.listener("http")
        self.assertEqual(
            raised.exception.args[0],
            "presup: no listener named 'http' (this worker was given no listener)",
        )

    def test_bind_an_address(self):
        worker = self.stem("127.0.0.1:0")
        self.assertEqual(worker.names, ["127.0.0.1:0"])
        listener = worker.listener("127.0.0.1:0")
        self.assertEqual(listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        with socket.create_connection(listener.getsockname(), timeout=DEADLINE) as client:
            listener.settimeout(DEADLINE)
            conn, _ = listener.accept()
            with conn:
                client.sendall(b"ping")
                self.assertEqual(conn.recv(4), b"ping")

    def test_bind_a_list_and_a_dict(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "app.sock")
            worker = self.stem(["localhost:0", "unix:" + path])
            self.assertEqual(worker.names, ["localhost:0", "unix:" + path])
            self.assertIn(worker.listeners[0].family, (socket.AF_INET, socket.AF_INET6))
            self.assertEqual(worker.listener("unix:" + path).getsockname(), path)
            worker = self.stem({"http": "127.0.0.1:0", "admin": "127.0.0.1:0"})
            self.assertEqual(worker.names, ["http", "admin"])
            http, admin = worker.listener("http"), worker.listener("admin")
            self.assertNotEqual(http.getsockname(), admin.getsockname())

    @unittest.skipUnless(socket.has_ipv6, "no IPv6")
    def test_bind_ipv6(self):
        try:
            worker = self.stem("[::1]:0")
        except OSError as e:
            self.skipTest("no ::1 here: %s" % e)
        self.assertEqual(worker.listeners[0].family, socket.AF_INET6)
        self.assertEqual(worker.listeners[0].getsockname()[0], "::1")

    def test_a_stale_unix_socket_is_replaced_a_live_one_is_not(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "app.sock")
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            stale.bind(path)
            stale.close()  # the file stays, nobody accepts
            worker = self.stem("unix:" + path)
            with self.assertRaises(OSError) as raised:
                presup.stem(bind="unix:" + path)
            self.assertIn("a process accepts on it already", str(raised.exception))
            worker.listeners[0].close()

    def test_a_bad_address_is_a_clear_error(self):
        with self.assertRaises(ValueError) as raised:
            presup.stem(bind="8000")
        self.assertEqual(
            str(raised.exception), "presup.stem(bind=...): '8000' is not HOST:PORT or unix:PATH"
        )
        taken = self.stem("127.0.0.1:0").listeners[0]
        with self.assertRaises(OSError) as raised:
            presup.stem(bind="127.0.0.1:%d" % taken.getsockname()[1])
        self.assertIn("cannot bind 127.0.0.1:", str(raised.exception))
