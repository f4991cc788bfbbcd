#!/usr/bin/env python3
"""Keep-alive latency of an ASGI app served by uvicorn on presup's listener. Prints figures;
asserts nothing.

    python3 bench/keepalive.py         # builds presup --release, makes target/bench-venv

One FastAPI app (`GET /` answers a small JSON document), one worker, 2000 requests in a row on
one kept-alive connection (Python's http.client), served four ways in one run:

- presup, the worker running `uvicorn --fd 3` on presup's TCP listener;
- uvicorn alone (`uvicorn --port`), binding its own socket;
- gunicorn with uvicorn's worker class (`-k uvicorn_worker.UvicornWorker`, one worker);
- `uvicorn --fd 3` on a socket without TCP_NODELAY (bound by `systemd-socket-activate`, which
  leaves it unset): what presup's workers got before it set the option.

uvicorn `--fd 3` wraps the inherited socket as a Unix socket, so asyncio never sets
TCP_NODELAY on its connections: a response written in two parts then waits for the client's
delayed ACK (about 40 ms a request) unless the listener itself has TCP_NODELAY, which Linux
copies to every accepted connection. presup sets it on every TCP listener.
"""

import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "presup")
VENV = os.path.join(ROOT, "target", "bench-venv")
PACKAGES = ["fastapi==0.165.0", "uvicorn==0.54.0", "gunicorn==27.0.1", "uvicorn-worker==0.4.0"]
REQUESTS = 500

APP = """
from fastapi import FastAPI
app = FastAPI()

@app.get("/")
def root():
    return {"ok": True}
"""


def venv_python():
    py = os.path.join(VENV, "bin", "python3")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    probe = "import fastapi, uvicorn, gunicorn, uvicorn_worker"
    if subprocess.run([py, "-c", probe], capture_output=True).returncode != 0:
        print(f"installing {' '.join(PACKAGES)} into {VENV}", flush=True)
        subprocess.run([py, "-m", "pip", "install", "--quiet", *PACKAGES], check=True)
    return py


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(port, proc, timeout=30):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/")
            c.getresponse().read()
            c.close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the server never answered")


def measure(port):
    """Latencies in ms of REQUESTS requests on one kept-alive connection."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out = []
    for _ in range(REQUESTS):
        t = time.perf_counter()
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        out.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, r.status
    c.close()
    return out


def run(name, argv, port, cwd, env):
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_answering(port, proc)
        lat = measure(port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    total_s = sum(lat) / 1000
    return (name, statistics.median(lat), sorted(lat)[int(len(lat) * 0.99)], REQUESTS / total_s)


def main():
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    py = venv_python()
    bindir = os.path.dirname(py)
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    rows = []
    with tempfile.TemporaryDirectory(prefix="presup-bench-") as d:
        with open(os.path.join(d, "app.py"), "w") as f:
            f.write(APP)
        port = free_port()
        with open(os.path.join(d, "supervisor.toml"), "w") as f:
            f.write(f"""graceful_timeout = "5s"
[[listen]]
name = "http"
address = "127.0.0.1:{port}"
[workers]
command = ["uvicorn", "--fd", "3", "--log-level", "warning", "app:app"]
count = 1
""")
        rows.append(run("presup + uvicorn --fd 3", [BIN, "-c", "supervisor.toml"], port, d, env))
        port = free_port()
        rows.append(run("uvicorn --port (alone)", ["uvicorn", "--port", str(port),
                                                   "--log-level", "warning", "app:app"], port, d, env))
        port = free_port()
        rows.append(run("gunicorn -k uvicorn_worker.UvicornWorker -w 1",
                        ["gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", "1", "-b",
                         f"127.0.0.1:{port}", "--no-control-socket", "app:app"], port, d, env))
        port = free_port()
        rows.append(run("uvicorn --fd 3, listener without TCP_NODELAY",
                        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "uvicorn", "--fd", "3",
                         "--log-level", "warning", "app:app"], port, d, env))
    print(f"\n{REQUESTS} GET / on one kept-alive connection, one worker\n")
    print("| server | median | p99 | requests/s |")
    print("| --- | --- | --- | --- |")
    for name, med, p99, rps in rows:
        print(f"| {name} | {med:.2f} ms | {p99:.2f} ms | {rps:.0f} |")


if __name__ == "__main__":
    main()
