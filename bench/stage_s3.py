"""Stage every object under an S3 prefix with cvtk-job's storage (the code `--data s3://…/` runs)."""

import sys

from cvtk_job import storage

storage.stage_prefix(sys.argv[1], keep=lambda uri: True)
