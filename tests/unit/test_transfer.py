"""transfer.Progress: the numbers of the progress line (the engine itself is tested against the real server in
tests/integration/test_storage.py and test_s3.py)."""

from cvtk_job import transfer


def test_progress_line_estimates_the_time_left_from_bytes_when_sizes_are_known(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(transfer.time, "monotonic", lambda: clock[0])
    p = transfer.Progress("staging 10 images", 10, total_bytes=100 * 2**20)
    clock[0] += 4.0
    p.add(nbytes=25 * 2**20, files=2)
    # 25 MiB in 4 s = 6.25 MiB/s; 75 MiB left = 12 s
    assert p.line() == "staging 10 images: 2 of 10 files, 25 of 100 MiB, 6.2 MiB/s, about 12 s left"


def test_progress_line_estimates_from_files_when_sizes_are_unknown(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(transfer.time, "monotonic", lambda: clock[0])
    p = transfer.Progress("staging 1000 images", 1000)
    assert p.line() == "staging 1000 images: 0 of 1,000 files, 0 MiB, 0.0 MiB/s"
    clock[0] += 10.0
    p.add(nbytes=2**20, files=250)
    assert p.line() == "staging 1000 images: 250 of 1,000 files, 1 MiB, 0.1 MiB/s, about 30 s left"


def test_progress_logs_at_most_once_per_period(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(transfer.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(transfer, "PROGRESS_SECONDS", 10.0)
    logged = []
    monkeypatch.setattr(transfer.log, "info", lambda fmt, line: logged.append(line))
    p = transfer.Progress("uploading 3 files", 3, total_bytes=3)
    for t in (1, 5, 9.9, 10, 12, 19, 20.5):
        clock[0] = t
        p.maybe_log()
    assert len(logged) == 2  # at 10 and at 20.5


def _crt_keys(provider):
    got = provider.get_credentials().result(timeout=10)
    return got.access_key_id, got.secret_access_key, got.session_token


def test_fixed_keys_are_handed_to_the_crt_once_and_expiring_ones_are_asked_each_time():
    """Fixed keys (environment, config file) cannot change during a run: the CRT holds a copy. Credentials that
    expire must be asked of boto3 at each signing, or a long sync-out signs with keys that have expired."""
    import datetime

    from botocore.credentials import Credentials, RefreshableCredentials

    fixed = Credentials("AKIDFIXED", "secret-fixed", None)
    provider = transfer._crt_credentials(fixed)
    fixed.access_key = "AKIDCHANGED"  # what a copy does not see
    assert _crt_keys(provider) == ("AKIDFIXED", "secret-fixed", None)

    issued = []

    def refresh():
        issued.append(len(issued))
        expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)  # always stale
        return {"access_key": f"ASIA{len(issued)}", "secret_key": "s", "token": f"t{len(issued)}",
                "expiry_time": expiry.isoformat()}

    role = RefreshableCredentials.create_from_metadata(refresh(), refresh, "assume-role")
    provider = transfer._crt_credentials(role)
    first, second = _crt_keys(provider), _crt_keys(provider)
    assert first[0] != second[0] and first[0].startswith("ASIA") and len(issued) >= 3
    assert transfer._crt_credentials(None) is None


def test_the_client_is_made_with_the_collector_paused_and_frozen_out_of_it_unless_the_caller_paused_it():
    """storage._long_lived: botocore's modules and models (~100,000 objects that live as long as the process)
    are frozen out of the cyclic collector, which is on again afterwards; a caller that has paused the collector
    itself (train, inference) keeps it paused and decides. In a subprocess: gc state is process-wide."""
    import subprocess
    import sys

    script = """
import gc, os, sys
os.environ.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true")
if sys.argv[1] == "paused":
    gc.disable()
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
from cvtk_job import storage
collections.clear()
before = gc.get_freeze_count()  # not always 0: a start-up hook may freeze (pyenv's Python 3.12 starts with 375)
storage.client()
print(gc.get_freeze_count() - before, gc.isenabled(), len(collections), "botocore" in sys.modules)
"""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        frozen, enabled, collections, loaded = out.stdout.split()
        return int(frozen), enabled == "True", int(collections), loaded == "True"

    frozen, enabled, collections, loaded = run("enabled")
    assert loaded and enabled and frozen > 50_000 and collections == 0
    assert run("paused") == (0, False, 0, True)
