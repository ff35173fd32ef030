"""Re-estimate BatchNorm statistics of an untrained network on realistic images.

A randomly initialised CU-Net keeps BatchNorm's initial statistics (mean 0, var 1),
which leaves its activations so small that float32 runs into denormal numbers and
times several times slower than a trained network; its ranges say nothing about
quantization either. Re-estimating the statistics on a few synthetic images gives
random weights the activation ranges and timings of a trained network (accuracy
still needs training). bench/ and the tests prepare the authors' configurations so.
"""

from __future__ import annotations

import numpy as np
import torch


def reestimate_batchnorm(model: torch.nn.Module, images: np.ndarray, batch_size: int = 4) -> torch.nn.Module:
    """Replace every BatchNorm's running statistics with their average over `images`
    (N x 3 x 256 x 256 float32 in [0, 1]); returns the model in eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    return model.eval()
