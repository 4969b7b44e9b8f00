"""Baseline: a bare MMEngine Runner on the config cvtk-job saved (X.py), without cvtk-job's hooks."""

import sys

from mmengine.config import Config
from mmengine.runner import Runner

config, work_dir = sys.argv[1:3]
cfg = Config.fromfile(config)
cfg.custom_hooks = []
cfg.train_dataloader.pop("worker_init_fn", None)  # cvtk-job's (detached loader workers); MMEngine's default
cfg.work_dir = work_dir
cfg.load_from, cfg.resume = None, False
cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
cfg.test_dataloader = cfg.test_evaluator = cfg.test_cfg = None
Runner.from_cfg(cfg).train()
