"""Starts a program as presup's master starts a child: given fds at given numbers, the rest
closed (subprocess's close_fds did that), variables set to the child's own pid. The tests'
stand-in for the master's spawn.

    launch.py '{"fds": {"3": 7, "4": 8}, "pid_vars": ["LISTEN_PID"]}' -- PROGRAM ARGS...

fd 7 of this process becomes fd 3 of PROGRAM, 8 becomes 4; LISTEN_PID is this process's pid,
which PROGRAM keeps (exec).
"""

import fcntl
import json
import os
import sys

plan = json.loads(sys.argv[1])
assert sys.argv[2] == "--"
argv = sys.argv[3:]
# Out of the way first: a source may be another one's target.
moved = {
    int(target): fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 100)
    for target, source in plan["fds"].items()
}
for source in set(plan["fds"].values()):
    os.close(source)
for target, fd in moved.items():
    os.dup2(fd, target)  # inheritable
    os.close(fd)
os.setpgid(0, 0)  # a process group of its own, as every child of presup's master
env = dict(os.environ)
for name in plan["pid_vars"]:
    env[name] = str(os.getpid())
os.execve(argv[0], argv, env)
