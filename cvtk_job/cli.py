"""Command line: pick the subcommand, parse its options, run it, map the outcome to an exit code.

This is the only place that decides exit codes. Heavy libraries (torch, mmdet) are imported by the
commands that need them, never here, so `--help`, `validate` and argument errors stay fast.
"""

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass

from argparse_dataclass import ArgumentParser

from . import __version__, options
from .errors import EXIT_BUG, EXIT_OK, CvtkJobError, DatasetError

log = logging.getLogger("cvtk_job")


@dataclass(frozen=True)
class Command:
    options: type
    summary: str


COMMANDS = {
    "train": Command(options.TrainOptions, "train a Mask R-CNN / Faster R-CNN model on COCO data"),
    "inference": Command(options.InferenceOptions, "predict on images: drawn images + instances.json"),
    "evaluate": Command(options.EvaluateOptions, "COCO metrics of predictions against ground truth"),
    "validate": Command(options.ValidateOptions, "check a dataset and its label file (no GPU needed)"),
    "doctor": Command(options.DoctorOptions, "check that the installed stack can train"),
    "create": Command(options.CreateOptions, "write a beginner's train/inference script (the tutorial's first step)"),
}

EPILOG = """exit codes: 0 ok, 1 unexpected bug, 2 wrong input (never retry), 3 storage/network failed
(retry), 4 training failed, 75 interrupted after a checkpoint (rerun to resume)

example:
  cvtk-job train --label data/label.txt --train data/train/segm.json --valid data/valid/segm.json \\
      --test data/test/segm.json --output_weights outputs/strawberry.pth
  cvtk-job inference --label data/label.txt --data data/test/images \\
      --model_weights outputs/strawberry.pth --output outputs/inference_results"""


def _top_parser():
    listing = "\n".join(f"  {name:<10} {cmd.summary}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="cvtk-job",
        description=f"Train and run MMDetection instance segmentation / detection as batch jobs.\n\n"
                    f"commands:\n{listing}",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cvtk-job {__version__}")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND",
                        help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of the command (COMMAND --help)")
    return parser


def parse(argv):
    """argv → (command name, options dataclass). Argument errors exit 2 through argparse."""
    top = _top_parser().parse_args(argv)
    command = COMMANDS[top.command]
    sub = ArgumentParser(command.options, prog=f"cvtk-job {top.command}", description=command.summary)
    return top.command, sub.parse_args(top.args)


def _setup_logging():
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _termination_log(code, message):
    """Kubernetes shows /dev/termination-log as the pod's termination message: say why in one line."""
    path = os.environ.get("CVTK_JOB_TERMINATION_LOG", "/dev/termination-log")
    if os.path.exists(path):
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(f"exit {code}: {message}"[:4000])
        except OSError:
            pass


def main(argv=None):
    """Run one command; the exit code is also left for `cvtk_job.torchrun` when it started this worker."""
    from .torchrun import record_exit_code

    code = EXIT_BUG
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
    except SystemExit as err:  # argparse: --help (0) or an argument error (2)
        code = err.code if isinstance(err.code, int) else EXIT_BUG
        raise
    finally:
        record_exit_code(code)
    if code and _one_of_several_tasks():
        _leave_now(code)
    return code


def _one_of_several_tasks(env=None):
    env = os.environ if env is None else env
    return int(env.get("WORLD_SIZE") or 1) > 1 or int(env.get("SLURM_NTASKS") or env.get("SLURM_STEP_NUM_TASKS")
                                                       or 1) > 1


def _leave_now(code):
    """Exit at once, with `code`. `srun --kill-on-bad-exit` signals the other tasks as soon as one exits
    non-zero; a task already on its way out with the same code (bad input, a stop agreed by all ranks)
    would then die of that SIGTERM during interpreter shutdown (Python restores the default handler
    there) and report 143, and the job's code would no longer be 2 or 75."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _main(argv):
    name, opts = parse(argv)
    _setup_logging()
    try:
        module = importlib.import_module(f"cvtk_job.commands.{name}")
        module.run(opts)
        return EXIT_OK
    except DatasetError as err:
        for line in err.problems:
            print(f"error: {line}", file=sys.stderr)
        _termination_log(err.exit_code, f"{len(err.problems)} dataset problem(s), first: {err.problems[0]}")
        return err.exit_code
    except CvtkJobError as err:
        print(f"cvtk-job {name}: error: {err}", file=sys.stderr)
        _termination_log(err.exit_code, str(err))
        return err.exit_code
    except KeyboardInterrupt:
        print(f"cvtk-job {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns a bug into exit code 1
        log.exception("unexpected error (a bug in cvtk-job, please report it)")
        _termination_log(EXIT_BUG, f"unexpected {type(err).__name__}: {err}")
        return EXIT_BUG


if __name__ == "__main__":  # `python -m cvtk_job.cli`, like `python -m cvtk_job`
    sys.exit(main())
