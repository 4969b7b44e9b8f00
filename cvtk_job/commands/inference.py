"""`cvtk-job inference`: not implemented yet (see its issue)."""

from ..errors import UserError


def run(opts):
    raise UserError("inference is not implemented yet")
