"""`cvtk-job train`: not implemented yet (see its issue)."""

from ..errors import UserError


def run(opts):
    raise UserError("train is not implemented yet")
