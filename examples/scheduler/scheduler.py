"""The scheduler singleton (seed 001): one email per tick, and each tick's email exactly once.

Started from an app's lifespan under `uvicorn --workers 4`, a scheduler runs four times and
every email goes out four times. presup runs it as a [[singleton]] instead: one instance, beside
the workers, restarted when it dies, never two at once. What is left to the scheduler is not to
skip or repeat a tick across its own restarts:

- ticks are numbered on the wall clock, `int(time.time() // TICK)`, so a restarted scheduler
  knows which ticks passed while it was down;
- it sends a tick's email, then records that tick as the last one sent, atomically (write,
  fsync, rename) in $SCHEDULER_STATE; on start it sends every tick after the recorded one;
- each email carries an `Idempotency-Key` naming its tick, as HTTP APIs that send or charge
  accept (Stripe's, for one): if the scheduler is killed between a send and its record, the
  restarted one sends that tick again and the API answers with the first email instead of
  sending a second one;
- after a long outage it does not flood the inbox: ticks more than $CATCH_UP seconds old when
  it starts are skipped, and said so.

On SIGTERM it stops between ticks, never between a send and its record.
"""

import json
import os
import signal
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import presup_child  # noqa: E402  (examples/presup_child.py)

TICK = float(os.environ.get("TICK", "1.0"))  # seconds
CATCH_UP = float(os.environ.get("CATCH_UP", "60"))  # seconds
STATE = os.environ.get("SCHEDULER_STATE", "run/scheduler.json")
SINK = os.environ.get("MAIL_SINK", "http://127.0.0.1:8025/send")


def load():
    """The last tick sent, or None on the very first start (or with another TICK)."""
    try:
        with open(STATE) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    return state["last_sent"] if state.get("tick") == TICK else None


def save(last_sent):
    os.makedirs(os.path.dirname(STATE) or ".", exist_ok=True)
    with open(STATE + ".tmp", "w") as f:
        json.dump({"tick": TICK, "last_sent": last_sent}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(STATE + ".tmp", STATE)  # atomic: a reader sees the old state or the new one


def send(tick):
    email = {
        "to": "reports@example.com",
        "subject": f"Report for tick {tick}",
        "tick": tick,
        "pid": os.getpid(),
    }
    headers = {"Content-Type": "application/json", "Idempotency-Key": f"report-{tick}"}
    post = urllib.request.Request(SINK, json.dumps(email).encode(), headers)
    urllib.request.urlopen(post, timeout=10).close()


sending = False
stopping = False


def on_term(signum, frame):
    global stopping
    stopping = True
    if not sending:
        sys.exit(0)


def main():
    global sending
    signal.signal(signal.SIGTERM, on_term)
    last_sent = load()
    if last_sent is None:  # first start ever: the first email is for the next tick
        last_sent = int(time.time() // TICK)
        save(last_sent)
    oldest = int((time.time() - CATCH_UP) // TICK)
    if last_sent < oldest:
        print(f"scheduler: ticks {last_sent + 1} to {oldest} are too old, skipped", flush=True)
        last_sent = oldest
        save(last_sent)
    print(f"scheduler: pid {os.getpid()}, last tick sent {last_sent}", flush=True)
    while True:
        now = int(time.time() // TICK)
        sending = True
        for tick in range(last_sent + 1, now + 1):  # one tick, or those missed while down
            try:
                send(tick)
            except OSError as e:
                print(f"scheduler: tick {tick} not sent, retrying next tick: {e}", flush=True)
                break
            save(tick)
            last_sent = tick
        sending = False
        if stopping:
            sys.exit(0)
        time.sleep(max(0.0, (now + 1) * TICK - time.time()))  # until the next tick begins


if __name__ == "__main__":
    presup_child.record_pid()
    main()
