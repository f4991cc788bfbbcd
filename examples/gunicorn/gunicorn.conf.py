# gunicorn's own settings, read from the working directory (the directory of supervisor.toml).
# Each presup worker runs one gunicorn arbiter with these settings; presup owns the listening
# socket (gunicorn finds it through LISTEN_FDS: do not pass -b) and restarts, reloads and
# scales the arbiters.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

workers = 2
# The app is imported by the arbiter before it tells presup READY=1 (ready = "notify"), so a
# worker is "up" only once the app has loaded, and a reload's new generation proves itself.
preload_app = True
# gunicorn >= 25 opens one control socket per arbiter at a fixed path (~/.gunicorn/...): every
# presup worker but the first would fail with "File exists". presup is the control plane here.
control_socket_disable = True


def post_fork(server, worker):
    # For the tests: every process started here records its pid (examples/presup_child.py).
    import presup_child

    presup_child.record_pid()
