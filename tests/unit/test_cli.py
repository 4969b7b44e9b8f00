"""The command line: subcommands, help at every level, argument errors, and no heavy imports."""

import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE, run_cli

SUBCOMMANDS = ["train", "inference", "evaluate", "validate", "doctor", "create"]
# What each subcommand requires (validate and doctor need nothing).
REQUIRED = {"train": "--label, --train, --output_weights", "inference": "--label, --data, --model_weights",
            "evaluate": "--gt, --pred, --output", "create": "--script"}


def test_the_list_is_the_cli_s():
    from cvtk_job.cli import COMMANDS

    assert sorted(COMMANDS) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_missing_required_arguments_exit_2_naming_them(name):
    result = run_cli(name)
    assert result.returncode == 2
    assert f"the following arguments are required: {REQUIRED[name]}" in result.stderr
    assert "Traceback" not in result.stderr


def test_top_level_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"\n  {name} " in result.stdout
    assert "exit codes:" in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name):
    result = run_cli(name, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: cvtk-job {name}")


def test_seed_flag_spelling_and_dashed_spelling_both_parse():
    from cvtk_job.cli import parse

    _, a = parse(["train", "--label", "l", "--train", "t", "--output_weights", "o.pth", "--batch_size", "2"])
    _, b = parse(["train", "--label", "l", "--train", "t", "--output-weights", "o.pth", "--batch-size", "2"])
    assert a == b and a.batch_size == 2 and a.epoch == 10 and a.task == "segm"


@pytest.mark.parametrize("argv, message", [
    (["fly"], "invalid choice: 'fly'"),
    (["train", "--label", "l"], "the following arguments are required: --train, --output_weights"),
    (["train", "--label", "l", "--train", "t", "--output_weights", "o", "--epoch", "x"], "invalid int value"),
    (["train", "--label", "l", "--train", "t", "--output_weights", "o", "--task", "pose"], "invalid choice"),
])
def test_argument_errors_exit_2_with_usage(argv, message):
    result = run_cli(*argv)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _modules_after(argv):
    code = ("import sys\nfrom cvtk_job.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'mmdet', 'mmengine', 'mmcv', 'boto3')\n"
            "print('HEAVY:' + ' '.join(m for m in heavy if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO)
    marker = [line for line in result.stdout.splitlines() if line.startswith("HEAVY:")]
    assert marker, result.stderr
    return marker[-1][len("HEAVY:"):]


@pytest.mark.parametrize("argv", [
    ["--help"], *[[name, "--help"] for name in SUBCOMMANDS], ["train", "--label", "x"], ["inference"],
    ["evaluate"], ["create"],
    ["validate", "--label", str(SAMPLE / "label.txt"), str(SAMPLE / "train" / "segm.json")],
])
def test_help_validate_and_argument_errors_never_import_heavy_libraries(argv):
    assert _modules_after(argv) == ""


def test_entrypoint_and_module_are_the_same_cli():
    a = subprocess.run([sys.executable, "entrypoint.py", "--help"], capture_output=True, text=True, cwd=REPO)
    b = subprocess.run([sys.executable, "-m", "cvtk_job", "--help"], capture_output=True, text=True, cwd=REPO)
    assert a.stdout == b.stdout and a.returncode == b.returncode == 0
