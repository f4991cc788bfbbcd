"""presup.stem() in a real stem process (stem_app.py), against the master's side played by
the test (support.Master): the protocol's messages, and what each forked worker is and has."""

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import support
from support import (
    DEADLINE, Master, base_env, exit_code, fixture, read_within, status_field, wait_exit
)


class StemTestCase(support.ProcessTestCase):
    """A test with a TCP listener for the stem (fd 3, named "http"), the socket the workers
    report on ($TEST_REPORT) and a NOTIFY_SOCKET of the master's."""

    def setUp(self):
        super().setUp()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(self.listener.close)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.reports = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.reports.close)
        self.reports.bind(self.path("report.sock"))
        self.reports.listen(16)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(self.notify.close)
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify.bind(self.path("notify.sock"))

    def master(self, env=None, **kwargs):
        stem_env = {"IMPORT_LOG": self.path("imports")}
        stem_env.update(env or {})
        return Master(self, [self.listener], ["http"], env=stem_env, **kwargs)

    def worker_env(self, slot, **extra):
        """A worker's complete environment, as the master computes it."""
        env = base_env(
            PRESUP_WORKER_ID=str(slot),
            PRESUP_WORKER_COUNT="3",
            PRESUP_GENERATION="7",
            PRESUP_PRIMARY="1" if slot == 0 else "0",
            PRESUP_MASTER_PID=str(os.getpid()),
            LISTEN_FDS="1",
            LISTEN_FDNAMES="http",
            LISTEN_PID="1",
            NOTIFY_SOCKET=self.path("notify.sock"),
            WATCHDOG_USEC="5000000",
            TEST_REPORT=self.path("report.sock"),
            APP_SETTING="spaces, = signs and \u00e9",
        )
        env.update(extra)
        return env

    def report(self):
        """The next worker's report of what it sees."""
        self.reports.settimeout(DEADLINE)
        conn, _ = self.reports.accept()
        with conn:
            conn.settimeout(DEADLINE)
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        return json.loads(data.decode("utf-8"))

    def started(self, master, slot, **extra):
        """Forks a worker for `slot`; returns its pid and its report."""
        pid = master.fork(100 + slot, self.worker_env(slot, **extra), slot=slot, generation=7)
        report = self.report()
        self.assertEqual(report["pid"], pid)
        return pid, report


class ProtocolTest(StemTestCase):
    def test_ready_then_each_fork_answered_in_order(self):
        master = self.master()
        master.expect_ready()
        for n in range(3):
            env = self.worker_env(n)
            master.send({"v": 1, "type": "fork", "id": 2**63 + n, "slot": n, "generation": 7,
                         "env": env, "pid_vars": ["LISTEN_PID"]})
        pids = []
        for n in range(3):
            answer = master.recv()
            self.assertEqual(answer["type"], "forked", answer)
            self.assertEqual(answer["id"], 2**63 + n)  # a u64, given back as it came
            self.track(answer["pid"])
            pids.append(answer["pid"])
        reports = sorted((self.report() for _ in pids), key=lambda r: r["slot"])
        self.assertEqual([r["pid"] for r in reports], pids)

    def test_eof_ends_the_stem_with_code_0_and_leaves_its_workers(self):
        master = self.master()
        master.expect_ready()
        pid, _ = self.started(master, 0)
        master.sock.close()
        self.assertEqual(master.wait(), 0, master.stderr())
        self.assertIn(status_field(pid, "State")[0], "RS", "the worker died with the stem")
        self.assertEqual(int(status_field(pid, "PPid")), os.getpid())

    def test_unknown_types_are_ignored_and_logged(self):
        master = self.master()
        master.expect_ready()
        master.send({"v": 1, "type": "hello", "id": 1})
        self.started(master, 0)
        self.assertIn("ignoring a message of unknown type 'hello'", master.stderr())

    def test_another_version_ends_the_stem_with_code_1(self):
        master = self.master()
        master.expect_ready()
        master.send({"v": 2, "type": "fork", "id": 1})
        self.assertEqual(master.wait(), 1)
        self.assertIn("protocol version 2, where this client speaks version 1", master.stderr())

    def test_a_message_that_is_not_json_ends_the_stem_with_code_1(self):
        master = self.master()
        master.expect_ready()
        master.sock.send(b"fork me")
        self.assertEqual(master.wait(), 1)
        self.assertIn("a message that is not UTF-8 JSON", master.stderr())

    def test_a_malformed_fork_request_ends_the_stem_with_code_1(self):
        master = self.master()
        master.expect_ready()
        master.send({"v": 1, "type": "fork", "id": 1, "slot": 0, "generation": 1, "env": ["A=1"]})
        self.assertEqual(master.wait(), 1)
        self.assertIn("a fork request whose env is not an object of variables", master.stderr())

    def test_threads_before_stem_are_refused(self):
        master = self.master(env={"FIXTURE_THREADS": "2"})
        answer = master.recv()
        self.assertEqual(sorted(answer), ["error", "type", "v"])
        self.assertEqual((answer["v"], answer["type"]), (1, "refused"))
        error = answer["error"]
        self.assertIn("the stem runs 3 threads and forks only with one", error)
        self.assertIn("Start threads after presup.stem() returns", error)
        self.assertIn("OPENBLAS_NUM_THREADS=1", error)
        self.assertIn("'fixture-0', 'fixture-1'", error)
        self.assertEqual(master.wait(), 1)
        self.assertIn(error, master.stderr())

    def test_a_master_pid_that_is_no_pid_is_refused(self):
        master = self.master(env={"PRESUP_MASTER_PID": "master"})
        answer = master.recv()
        self.assertEqual(answer["type"], "refused")
        self.assertIn("PRESUP_MASTER_PID='master' is not a pid", answer["error"])
        self.assertEqual(master.wait(), 1)


class WorkerTest(StemTestCase):
    def test_a_worker_is_the_masters_child_in_a_group_of_its_own(self):
        master = self.master()
        master.expect_ready()
        pid = master.fork(1, self.worker_env(1), slot=1)
        # True as soon as `forked` is sent: the middle is reaped, its setpgid done.
        self.assertEqual(int(status_field(pid, "PPid")), os.getpid())
        self.assertEqual(os.getpgid(pid), pid)
        report = self.report()
        self.assertEqual((report["pid"], report["ppid"], report["pgid"]), (pid, os.getpid(), pid))
        self.assertEqual(report["pdeathsig"], signal.SIGKILL)
        self.assertEqual(report["threads"], 1)
        self.assertNotEqual(os.getpgid(master.pid), pid)

    def test_a_worker_gets_the_environment_of_its_request(self):
        master = self.master(env={"STEM_ONLY": "1"})
        master.expect_ready()
        pid, report = self.started(master, 2)
        expected = self.worker_env(2)
        expected["LISTEN_PID"] = str(pid)
        expected["WATCHDOG_PID"] = str(pid)  # not in env: pid_vars adds it
        self.assertEqual(report["environ"], expected)
        self.assertEqual(report["c_environ"], expected)

    def test_a_worker_has_its_slot_generation_and_listeners(self):
        master = self.master()
        master.expect_ready()
        pid, report = self.started(master, 0)
        self.assertEqual(
            (report["slot"], report["count"], report["generation"], report["primary"]),
            (0, 3, 7, True),
        )
        self.assertEqual(report["names"], ["http"])
        address = list(self.listener.getsockname())
        self.assertEqual(report["listeners"], [[3, socket.AF_INET, socket.SOCK_STREAM, address]])
        self.assertEqual(report["inheritable"], [True])
        self.assertEqual(
            report["missing_listener_error"],
            "presup: no listener named 'no-such-listener' (the listeners are 'http')",
        )
        with socket.create_connection(self.listener.getsockname(), timeout=DEADLINE) as conn:
            answer = json.loads(conn.makefile("rb").read().decode("utf-8"))
        self.assertEqual(answer, {"pid": pid, "slot": 0, "token": report["state_token"]})
        _, report = self.started(master, 1)
        self.assertEqual((report["slot"], report["primary"]), (1, False))

    def test_a_worker_notifies_the_master_from_its_own_pid(self):
        master = self.master()
        master.expect_ready()
        pid, report = self.started(master, 0)
        self.assertTrue(report["notified"])
        self.notify.settimeout(DEADLINE)
        data, ancillary, _, _ = self.notify.recvmsg(4096, socket.CMSG_SPACE(12))
        self.assertEqual(data, b"READY=1")
        creds = [struct.unpack("iII", d)[0] for _, t, d in ancillary if t == socket.SCM_CREDENTIALS]
        self.assertEqual(creds, [pid])

    def test_workers_share_the_state_imported_once_in_the_stem(self):
        master = self.master()
        master.expect_ready()
        reports = [self.started(master, slot)[1] for slot in range(3)]
        imports = self.read("imports").split()
        self.assertEqual(imports, [str(master.pid), reports[0]["state_token"]], "once, by the stem")
        for report in reports:
            self.assertEqual(report["state_token"], imports[1])
            self.assertEqual(report["state_built_by"], master.pid)
            self.assertEqual(report["state_sum"], sum(i * i for i in range(10)))
            self.assertGreater(report["gc_frozen"], 0)
            # os.fork twice: the hooks ran in the middle, then in the worker.
            self.assertEqual(report["at_fork_in_child"], 2)
        self.assertEqual(len({r["random"] for r in reports}), 3, "random reseeded in each worker")

    def test_a_worker_keeps_no_fd_of_the_stem(self):
        master = self.master(env={"FIXTURE_SIGNALS": "1"})
        master.expect_ready()
        for slot in range(2):  # the second one: after the stem's loop has run once
            _, report = self.started(master, slot)
            app = {str(fd) for fd in report["app_fds"]}
            own = {fd: link for fd, link in report["fds"].items() if int(fd) >= 3 and fd not in app}
            self.assertEqual(sorted(own), ["3"], report["fds"])
            self.assertTrue(own["3"].startswith("socket:"), own)
            self.assertEqual(len(app), 2)

    def test_what_the_stem_printed_is_written_once(self):
        with open(self.path("stdout"), "wb") as stdout:
            master = self.master(stdout=stdout)
        master.expect_ready()
        pids = [self.started(master, slot)[0] for slot in range(2)]
        expected = ["the stem imported its app"] + ["worker %d" % pid for pid in pids]
        self.assertEqual(self.read("stdout").splitlines(), expected)

    def test_a_worker_starts_with_a_fresh_pythons_signals(self):
        master = self.master(env={"FIXTURE_SIGNALS": "1"})
        master.expect_ready()
        _, report = self.started(master, 0)
        expected = {}
        for signum in signal.valid_signals():
            if signum in (signal.SIGKILL, signal.SIGSTOP):
                continue
            if signum == signal.SIGINT:
                expected[str(int(signum))] = "default_int_handler"
            elif signum in (signal.SIGPIPE, signal.SIGXFSZ):
                expected[str(int(signum))] = "ign"
            else:
                expected[str(int(signum))] = "dfl"
        self.assertEqual(report["dispositions"], expected)
        self.assertEqual(report["mask"], [])
        self.assertEqual(report["wakeup_fd"], -1)

    def test_a_worker_whose_parent_is_not_the_master_exits_1(self):
        # The stem believes in another master: its worker's parent (this test) is not it.
        master = self.master(env={"PRESUP_MASTER_PID": str(os.getppid())})
        master.expect_ready()
        pid = master.fork(1, self.worker_env(0))
        self.assertEqual(exit_code(wait_exit(pid)), 1)

    def test_a_worker_whose_environment_is_wrong_exits_1_saying_why(self):
        master = self.master()
        master.expect_ready()
        pid = master.fork(1, self.worker_env(0, PRESUP_GENERATION="seven"))
        self.assertEqual(exit_code(wait_exit(pid)), 1)
        self.assertIn(
            "(slot 0): cannot start: RuntimeError: "
            "presup: PRESUP_GENERATION='seven' is not a number",
            master.stderr(),
        )
        pid, _ = self.started(master, 1)  # the stem serves on

    def test_workers_die_when_their_master_does(self):
        env = base_env(IMPORT_LOG=self.path("imports"), TEST_REPORT=self.path("report.sock"))
        with open(self.path("stderr"), "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, fixture("intermediate.py"), json.dumps(env)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        self.addCleanup(self.stop_process, proc)
        line = read_within(proc.stdout.fileno())
        self.assertTrue(line, "intermediate.py said nothing; its stderr:\n" + self.read("stderr"))
        pids = json.loads(line.decode("utf-8"))
        self.track(pids["stem"])
        self.track(pids["worker"])
        # Once it reports, the worker has its PDEATHSIG (killed sooner, it would see that its
        # parent is not the master any more, and exit 1).
        self.assertEqual(self.report()["pid"], pids["worker"])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(DEADLINE)
        # Both are this test's children now (a subreaper): the worker killed by its PDEATHSIG,
        # the stem ended by the EOF on its socket.
        self.assertEqual(exit_code(wait_exit(pids["worker"])), -signal.SIGKILL)
        self.assertEqual(exit_code(wait_exit(pids["stem"])), 0)


class StemSocketTest(support.ProcessTestCase):
    """A PRESUP_STEM_FD that is not the master's socket: a clear error, exit code 1."""

    def run_stem(self, value, fds=None):
        env = base_env(PRESUP_STEM_FD=value, PRESUP_MASTER_PID=str(os.getpid()))
        proc = self.spawn([sys.executable, fixture("stem_app.py")], fds, env)
        self.assertEqual(proc.wait(DEADLINE), 1)
        return self.read("stderr")

    def test_not_a_number(self):
        self.assertIn(
            "RuntimeError: presup.stem(): PRESUP_STEM_FD='three' is not a file descriptor number",
            self.run_stem("three"),
        )

    def test_not_open(self):
        self.assertIn("PRESUP_STEM_FD=9, but fd 9 is not open", self.run_stem("9"))

    def test_not_a_socket(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertIn("PRESUP_STEM_FD=3, but fd 3 is not a socket", self.run_stem("3", {3: r}))

    def test_not_a_seqpacket_socket(self):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertIn(
            "PRESUP_STEM_FD=3, but fd 3 is not the master's Unix SOCK_SEQPACKET socket "
            "(it is AF_UNIX, SOCK_STREAM)",
            self.run_stem("3", {3: b}),
        )
