"""The limit for inference: the same model and pipeline, batches through the model, nothing written."""

import sys

import torch

from cvtk_job import checkpoints, configdata, images, predictor

weights_path, folder, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
workers = int(sys.argv[5]) if len(sys.argv) > 5 else 2
weights = checkpoints.load_weights(weights_path)
cfg = configdata.load(weights["meta"]["config"], weights_path)
model = predictor.load_model(cfg, weights, device)
dataset = predictor.ImageDataset(images.collect(folder).images, predictor.pipeline(cfg), keep_original=False)
loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
for group in predictor.same_size_batches(loader, batch, 4 * batch):
    predictor.predict(model, [item.data for item in group])
