"""Stop cleanly on SIGTERM / SIGUSR1 (Kubernetes eviction, Slurm's --signal, docker stop).

The handler only raises a flag; the training loop looks at it at the next iteration boundary, so a
signal never lands in the middle of a checkpoint write. The job then stops with exit code 75 and
resumes from its last complete epoch checkpoint when it is run again: a signal costs at most the
epoch in progress.
"""

import logging
import signal
import threading

log = logging.getLogger(__name__)
_requested = threading.Event()
_signal_name = []


def _handler(signum, frame):
    if not _requested.is_set():
        _signal_name.append(signal.Signals(signum).name)
        _requested.set()
        log.warning("%s received: stopping at the next iteration; rerun the same command to resume",
                    signal.Signals(signum).name)


def install():
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def requested():
    return _requested.is_set()


def name():
    return _signal_name[0] if _signal_name else "signal"
