"""Baseline: mmdet's DetInferencer over a folder, drawing on and predictions saved (its defaults)."""

import sys

from cvtk_job import checkpoints

config, weights, folder, out, batch, threshold = sys.argv[1:7]
device = sys.argv[7] if len(sys.argv) > 7 else "cpu"
checkpoints.allow_mmengine_checkpoints()
from mmdet.apis import DetInferencer  # noqa: E402

inferencer = DetInferencer(model=config, weights=weights, device=device, show_progress=False)
inferencer(folder, batch_size=int(batch), out_dir=out, no_save_pred=False, pred_score_thr=float(threshold))
