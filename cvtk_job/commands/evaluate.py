"""`cvtk-job evaluate`: not implemented yet (see its issue)."""

from ..errors import UserError


def run(opts):
    raise UserError("evaluate is not implemented yet")
