"""A Discord interactions bot in Flask, served by presup's workers (seed 000).

Under `gunicorn -w 4` every worker registered the slash commands when it imported the app, and
Discord answered the second registration with 429. Here registration is a separate command that
presup runs once, as the `on_starting` hook, before any worker starts; workers only serve:

    python3 app.py register   # PUT the commands to $DISCORD_API_BASE; non-zero exit on failure
    python3 app.py            # a worker: serve on the listener presup passes as fd 3
"""

import json
import os
import sys
import urllib.error
import urllib.request

from flask import Flask, jsonify, request
from werkzeug.serving import make_server

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

COMMANDS = [
    {"name": "ping", "description": "Is the bot alive?", "type": 1},
    {"name": "whoami", "description": "Which worker answers", "type": 1},
]
app = Flask(__name__)


def slot():
    # Read when a request comes, not at import: a stem (../interactions-stem/) imports this
    # module once, before any worker exists, and each worker it forks gets its own environment.
    return os.environ.get("PRESUP_WORKER_ID", "?")


@app.get("/")
def health():
    generation = os.environ.get("PRESUP_GENERATION", "?")
    return f"slot {slot()} pid {os.getpid()} generation {generation}\n"


@app.post("/interactions")
def interactions():
    # A real bot first checks the X-Signature-Ed25519 header against the application's public
    # key (with PyNaCl, say); left out to keep this example to the standard library and Flask.
    interaction = request.get_json(force=True)
    if interaction.get("type") == 1:  # PING, sent by Discord to check the endpoint
        return jsonify(type=1)  # PONG
    if interaction.get("type") == 2:  # APPLICATION_COMMAND
        name = interaction.get("data", {}).get("name")
        text = "pong" if name == "ping" else f"slot {slot()}, pid {os.getpid()}"
        return jsonify(type=4, data={"content": text})  # CHANNEL_MESSAGE_WITH_SOURCE
    return jsonify(error="unsupported interaction type"), 400


def register():
    """Overwrites the application's global commands: one PUT, as Discord's bulk endpoint."""
    base = os.environ["DISCORD_API_BASE"]  # https://discord.com/api/v10 in production
    url = f"{base}/applications/{os.environ['DISCORD_APPLICATION_ID']}/commands"
    headers = {
        "Authorization": f"Bot {os.environ['DISCORD_TOKEN']}",
        "Content-Type": "application/json",
    }
    put = urllib.request.Request(url, json.dumps(COMMANDS).encode(), headers, method="PUT")
    try:
        with urllib.request.urlopen(put, timeout=10) as response:
            registered = json.load(response)
    except urllib.error.HTTPError as e:  # 429 included: presup retries the hook with backoff
        sys.exit(f"register: HTTP {e.code} from {url}: {e.read().decode(errors='replace')}")
    except OSError as e:
        sys.exit(f"register: {url}: {e}")
    print(f"register: {len(registered)} commands registered", flush=True)


def serve():
    listener = presup_child.inherited_listener("run it under presup, or `app.py register`")
    # werkzeug's server on the inherited fd 3 (it takes a duplicate; host and port are then
    # unused, the address family comes from the host: an IPv4 listener here). One process, one
    # request at a time: presup runs as many workers as wanted.
    server = make_server("127.0.0.1", 0, app, fd=listener.detach())
    presup_child.serve(server)


if __name__ == "__main__":
    presup_child.record_pid()
    if sys.argv[1:] == ["register"]:
        register()
    else:
        serve()
