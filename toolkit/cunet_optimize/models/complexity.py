"""Parameter count, weight size and multiply-accumulates of a CU-Net configuration.

Computed on PyTorch's meta device: shapes only, no memory, no arithmetic, so even
the 16-U-Net pose model is measured in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cunet_optimize.models.cunet import INPUT_SIZE, CUNet, CUNetConfig


@dataclass(frozen=True)
class Complexity:
    parameters: int  # every stored parameter (all N heads, as in the checkpoints)
    fp32_bytes: int  # parameters + BatchNorm running statistics, 4 bytes each
    macs: int  # multiply-accumulates of the convolutions for one image


def measure_complexity(config: CUNetConfig, input_size: int = INPUT_SIZE) -> Complexity:
    with torch.device("meta"):
        model = CUNet(config).eval()
    macs = 0

    def count(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal macs
        k = module.kernel_size[0] * module.kernel_size[1]
        macs += output.numel() * k * module.in_channels // module.groups

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, input_size, input_size, device="meta"))
    for h in hooks:
        h.remove()
    params = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for name, b in model.named_buffers() if not name.endswith("num_batches_tracked"))
    return Complexity(parameters=params, fp32_bytes=4 * (params + stats), macs=macs)
