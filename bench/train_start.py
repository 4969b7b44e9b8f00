"""Seconds from a training command's start to its first training progress line (issue 14 b).

    python bench/train_start.py [--py-spy OUT.txt] -- CMD...
        runs CMD (stdout and stderr merged), prints the seconds until the first `Epoch(train) [1][`
        line, then kills CMD and its children. With --py-spy, CMD runs under `py-spy record --idle
        -f raw` (wall-clock samples, I/O waits included) and the samples up to that line go to OUT.txt.

MMEngine's LoggerHook writes that line after `log_interval` iterations, so both sides of the bench
must run with the same interval (the bare runner uses the config cvtk-job built, interval included).
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

FIRST_PROGRESS = re.compile(r"Epoch\(train\)\s*\[1\]\[\s*\d+/\d+\]")


def _children():
    """{pid: [child pids]} of the processes visible in /proc."""
    tree = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid):
    tree, found, todo = _children(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def first_iteration(cmd, env=None, timeout=3600, py_spy=None):
    """(seconds from starting `cmd` to its first training progress line, that line); `cmd` is killed after it.

    Its loader workers sit in process groups of their own (cvtk-job detaches them), so they are killed
    by pid along with every other descendant, not by process group."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    full = [str(c) for c in cmd]
    if py_spy:
        spy = Path(sys.executable).parent / "py-spy"
        full = [str(spy), "record", "--idle", "-f", "raw", "-o", str(py_spy), "--", *full]
    tail = deque(maxlen=40)
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", env=env, start_new_session=True)
    timer = threading.Timer(timeout, lambda: _kill([*_descendants(proc.pid), proc.pid]))
    timer.start()
    seconds = progress = None
    try:
        for line in proc.stdout:
            if FIRST_PROGRESS.search(line):
                seconds, progress = time.perf_counter() - start, line.strip()
                break
            tail.append(line)
    finally:
        timer.cancel()
        # Under py-spy only the profiled command (and its children) die: py-spy then writes its samples.
        _kill(_descendants(proc.pid) if py_spy else [*_descendants(proc.pid), proc.pid])
        if py_spy:
            for line in proc.stdout:
                tail.append(line)
        proc.wait()
        proc.stdout.close()
    if seconds is None:
        raise RuntimeError(f"no training progress line from {' '.join(full)} (exit {proc.returncode}):\n"
                           + "".join(tail)[-3000:])
    return seconds, progress


def iterations_time(progress):
    """Seconds the logged iterations took, from a progress line: MMEngine's `time` is their mean (window =
    log interval, as cvtk-job sets it), measured from the epoch's start, so this is the share of the line's
    time spent in the epoch loop (loader workers' start and the first batches included)."""
    n = int(re.search(r"\]\[\s*(\d+)/", progress).group(1))
    return n * float(re.search(r"\btime: ([0-9.]+)", progress).group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--py-spy", dest="py_spy", help="profile CMD with py-spy; raw samples to this file")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    opts = ap.parse_args(argv)
    cmd = opts.cmd[1:] if opts.cmd[:1] == ["--"] else opts.cmd
    if not cmd:
        ap.error("give the command after --")
    seconds, progress = first_iteration(cmd, timeout=opts.timeout, py_spy=opts.py_spy)
    print(f"{seconds:.2f} s to the first progress line, {seconds - iterations_time(progress):.2f} s before the "
          f"epoch loop\n{progress}")


if __name__ == "__main__":
    main()
