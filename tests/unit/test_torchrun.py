"""cvtk_job.torchrun: which exit code the scheduler sees (the agent itself is run in test_k8s_run)."""

import pytest

from cvtk_job import torchrun


@pytest.mark.parametrize("first, recorded, expected", [
    (2, {0: 2, 1: 2}, 2),
    (75, {0: 75, 1: 75}, 75),
    (1, {0: 2, 1: 1}, 2),        # rank 0 saw a broken collective (1) because rank 1 found bad input (2)
    (1, {0: 4}, 4),
    (-15, {0: 75, 1: 75}, 75),   # the agent's SIGTERM reached a rank after it had stopped
    (-9, {}, 1),                 # killed before it could say anything
    (1, {}, 1),
    (139, {}, 139),
])
def test_decide(first, recorded, expected):
    assert torchrun.decide(first, recorded) == expected


def test_workers_record_their_codes_where_the_launcher_reads_them(tmp_path):
    env = {torchrun.EXIT_DIR_ENV: str(tmp_path)}
    torchrun.record_exit_code(75, dict(env, RANK="0"))
    torchrun.record_exit_code(2, dict(env, RANK="3"))
    torchrun.record_exit_code(0, {"RANK": "1"})  # not started by the launcher: nothing written
    assert torchrun.worker_codes(str(tmp_path)) == {0: 75, 3: 2}


def test_the_cli_records_its_exit_code(tmp_path, monkeypatch):
    from cvtk_job import cli

    monkeypatch.setenv(torchrun.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["validate", str(tmp_path / "missing.json")]) == 2
    assert torchrun.worker_codes(str(tmp_path)) == {1: 2}
