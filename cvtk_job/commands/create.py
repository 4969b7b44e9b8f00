"""`cvtk-job create`: write the tutorial's beginner script (`--vanilla`: MMDetection only)."""

import os
import string
from importlib import resources

from .. import artifacts, mmconfig
from ..errors import UserError

TITLES = {"segm": "Instance segmentation", "det": "Object detection"}


def render(task, vanilla, model, script_name):
    template = resources.files("cvtk_job").joinpath("templates", "vanilla.py.tmpl" if vanilla else "script.py.tmpl")
    return string.Template(template.read_text(encoding="utf-8")).substitute(
        TITLE=TITLES[task], TASK=task, MODEL=model or mmconfig.DEFAULT_MODELS[task],
        KIND="segm" if task == "segm" else "bbox", SCRIPT=script_name)


def run(opts):
    if os.path.exists(opts.script) and not opts.force:
        raise UserError(f"{opts.script} already exists; choose another name or pass --force to overwrite it")
    if not opts.script.endswith(".py"):
        raise UserError(f"--script {opts.script}: give a Python file name ending in .py")
    if opts.model:
        mmconfig.resolve_model(opts.model, opts.task)  # an unknown name fails now, not when training
    artifacts.write_text(opts.script, render(opts.task, opts.vanilla, opts.model, os.path.basename(opts.script)))
    print(opts.script)
