"""ruff over the project (CI runs `make test` only, so lint is part of the suite)."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_ruff_passes():
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    result = subprocess.run([ruff, "check", "--no-cache", "cvtk_job", "tests", "bench", "tools", "entrypoint.py"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout
