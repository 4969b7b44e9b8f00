#!/usr/bin/env python3
"""Container and `python entrypoint.py` entry point: the same CLI as the `cvtk-job` console script."""
import sys

from cvtk_job.cli import main

if __name__ == "__main__":
    sys.exit(main())
