"""One exception hierarchy; `cli.main` is the only place that turns these into exit codes.

Exit codes (documented in the README; cluster templates rely on them):
  0  ok
  1  unexpected bug (a traceback is printed)
  2  the user's input is wrong (arguments, dataset, labels, credentials, missing object): never retry
  3  storage or network failed after retries: retrying may help
  4  training failed (loss became NaN/inf, evaluation empty)
  75 interrupted by a signal after saving a checkpoint: requeue and resume
"""

EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER = 2
EXIT_STORAGE = 3
EXIT_TRAINING = 4
EXIT_INTERRUPTED = 75


class CvtkJobError(Exception):
    """Base class of every error that cvtk-job reports without a traceback."""

    exit_code = EXIT_BUG


class UserError(CvtkJobError):
    """The input is wrong: arguments, files, labels. The message says what, where and how to fix it."""

    exit_code = EXIT_USER


class SetupError(UserError):
    """The installed stack is broken (missing package, mmcv ops not compiled): fix the installation."""


class DatasetError(UserError):
    """A dataset failed validation; `problems` holds one printable line per problem."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s) in the dataset")


class StorageError(CvtkJobError):
    """Storage or network failed after retries."""

    exit_code = EXIT_STORAGE


class TrainingError(CvtkJobError):
    """Training ran but failed (divergence, empty evaluation)."""

    exit_code = EXIT_TRAINING


class Interrupted(CvtkJobError):
    """A signal stopped the job after a checkpoint was saved; rerun the same command to resume."""

    exit_code = EXIT_INTERRUPTED
