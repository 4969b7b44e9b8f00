"""Stop cleanly on SIGTERM / SIGUSR1 (Kubernetes eviction, Slurm's --signal, docker stop).

The handler only raises a flag; the training loop looks at it at the next iteration boundary, so a
signal never lands in the middle of a checkpoint write. The job then stops with exit code 75 and
resumes from its last complete epoch checkpoint when it is run again: a signal costs at most the
epoch in progress.
"""

import logging
import re
import signal
import threading
import time

from .errors import UserError

log = logging.getLogger(__name__)
_requested = threading.Event()
_signal_name = []


def _handler(signum, frame):
    if not _requested.is_set():
        _signal_name.append(signal.Signals(signum).name)
        _requested.set()
        log.warning("%s received: stopping at the next iteration; rerun the same command to resume",
                    signal.Signals(signum).name)


_deadline = []


def install(time_limit_s=None):
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)
    if time_limit_s:
        _deadline.append(time.monotonic() + time_limit_s)


def parse_duration(text):
    """'3h50m', '90m', '45s', '1h' or plain seconds → seconds."""
    match = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text or "")
    if not text or not match or not any(match.groups()):
        raise UserError(f"--time_limit {text!r}: give a duration such as 3h50m, 90m or 3600")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def requested():
    if not _requested.is_set() and _deadline and time.monotonic() > _deadline[0]:
        _signal_name.append("--time_limit")
        _requested.set()
    return _requested.is_set()


def name():
    return _signal_name[0] if _signal_name else "signal"
