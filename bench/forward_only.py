"""The limit for inference: the same model and pipeline, batches through the model, nothing written."""

import sys

import torch
from mmengine.dataset import pseudo_collate
from mmengine.registry import init_default_scope

from cvtk_job import checkpoints, images
from cvtk_job.commands.inference import ImageDataset, _inference_pipeline, _load_config, same_size_batches

weights_path, folder, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
workers = int(sys.argv[5]) if len(sys.argv) > 5 else 2
weights = checkpoints.load_weights(weights_path)
cfg = _load_config(weights_path, weights["meta"])
init_default_scope("mmdet")
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

register_all_modules(init_default_scope=False)
model = MODELS.build(cfg.model)
model.load_state_dict(weights["state_dict"])
model.to(device).eval()
dataset = ImageDataset(images.collect(folder).images, _inference_pipeline(cfg), keep_original=False)
loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
with torch.no_grad():
    for group in same_size_batches(loader, batch, 4 * batch):
        model.test_step(pseudo_collate([item.data for item in group]))
