"""CU-Net: stacked U-Nets with order-K dense links (Tang et al., ECCV 2018).

One file for the model family, as in timm: the configuration, the blocks, the
network and the registry of named variants. Module and parameter names are those
of the authors' models/cu_net.py, so their checkpoints load by stripping the
DataParallel prefix and nothing else (see checkpoint.py).

What differs from the authors' code, on purpose:
- the order-K FIFOs are local variables of forward(), not module attributes, so the
  module is stateless (thread-safe, traceable for ONNX export);
- the memory-efficient mode updates BatchNorm running statistics once per step (the
  original's checkpointing updates them twice, once more in the recomputation);
- iterative refinement (`refine_iters`), which the paper proposes and the public
  code lacks, follows the definition in docs/CUNET.md.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cunet_optimize.errors import ConfigError

# The four down/up resolutions of one U-Net (64, 32, 16, 8 px for a 256 px input).
NUM_LEVELS = 4
INPUT_SIZE = 256
HEATMAP_SIZE = 64
# Heatmap channels of each task's layout (300-W faces, MPII joints); tasks.py builds on these.
POINTS_PER_TASK = {"face": 68, "pose": 16}


@dataclass(frozen=True)
class CUNetConfig:
    """Shape of a CU-Net. Field names are the paper's; the authors' names in comments."""

    num_unets: int = 8  # N, layer_num
    order: int = 1  # K, order: previous U-Nets feeding each one (K < N)
    num_classes: int = 68  # C, class_num: landmarks = heatmap channels
    width: int = 128  # c0, init_chan_num
    growth_rate: int = 32  # g
    neck_size: int = 4  # b: the 1x1 conv of a dense layer outputs b*g channels
    num_heads: int = 0  # L, loss_num; 0 means one head per U-Net (L = N)
    refine_iters: int = 1  # R: passes through the N U-Nets with shared weights

    def __post_init__(self) -> None:
        if self.num_heads == 0:
            object.__setattr__(self, "num_heads", self.num_unets)
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"model config: {f.name} must be an integer, got {value!r}")
        positive = ("num_unets", "num_classes", "width", "growth_rate", "neck_size", "refine_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.order < self.num_unets:
            raise ConfigError(
                f"model config: order K={self.order} needs 0 <= K < N={self.num_unets} "
                "(K = N-1 is fully dense): lower the order or add U-Nets (num_unets)"
            )
        if not 1 <= self.num_heads <= self.num_unets:
            raise ConfigError(
                f"model config: num_heads L={self.num_heads} needs 1 <= L <= N={self.num_unets}"
            )

    @property
    def loss_anchors(self) -> list[int]:
        """1-based indices of the supervised U-Nets: round(h*N/L), h = 1..L.

        The authors ran Python 2, whose round() takes halves away from zero; Python 3
        rounds them to even, so floor(x + 0.5) keeps old checkpoints' heads in place.
        """
        every = float(self.num_unets) / float(self.num_heads)
        return [int(math.floor(every * (h + 1) + 0.5)) for h in range(self.num_heads)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CUNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters and keys) that behaves inside recomputed segments.

    A segment recomputed in backward runs its BatchNorms twice in training mode; the
    plain module would update the running statistics twice per step. Inside a
    segment both runs normalise with the batch statistics (so both save the same
    tensors and agree), and only the first run updates the running statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = getattr(_segment_state, "mode", None)
        if mode is None or not self.training:
            return super().forward(x)
        if mode == "forward":
            update_running_stats(self, x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


_segment_state = threading.local()


@contextmanager
def _segment_mode(mode: str):
    previous = getattr(_segment_state, "mode", None)
    _segment_state.mode = mode
    try:
        yield
    finally:
        _segment_state.mode = previous


def recomputed(fn, *inputs: torch.Tensor):
    """fn(*inputs), keeping only its inputs and outputs for backward: everything inside
    is recomputed when the gradient is needed (the memory-efficient training mode)."""
    return checkpoint(
        fn, *inputs, use_reentrant=False,
        context_fn=lambda: (_segment_mode("forward"), _segment_mode("recompute")),
    )


@torch.no_grad()
def update_running_stats(norm: nn.BatchNorm2d, x: torch.Tensor) -> None:
    """What a training-mode BatchNorm2d does to its buffers, without normalising."""
    if not norm.track_running_stats:
        return
    norm.num_batches_tracked.add_(1)
    momentum = norm.momentum if norm.momentum is not None else 1.0 / float(norm.num_batches_tracked)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=True)
    norm.running_mean.lerp_(mean, momentum)
    norm.running_var.lerp_(var, momentum)


def concat_bn_relu_conv(
    inputs: list[torch.Tensor], norm: nn.BatchNorm2d, conv: nn.Conv2d, memory_efficient: bool = False
) -> torch.Tensor:
    """Conv1x1(ReLU(BN(Concat(inputs)))): the opening of every dense layer, adapter and head."""
    if memory_efficient:
        return recomputed(lambda *xs: concat_bn_relu_conv(list(xs), norm, conv), *inputs)
    x = torch.cat(inputs, 1) if len(inputs) > 1 else inputs[0]
    return conv(F.relu(norm(x), inplace=True))


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=1, bias=False)


class Adapter(nn.Module):
    """BN -> ReLU -> Conv1x1 over a concatenation, compressing it back to c0 channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.adapter_norm = BatchNorm2d(in_channels)
        self.adapter_conv = _conv1x1(in_channels, out_channels)

    def forward(self, inputs: list[torch.Tensor], memory_efficient: bool = False) -> torch.Tensor:
        return concat_bn_relu_conv(inputs, self.adapter_norm, self.adapter_conv, memory_efficient)


class DenseLayer(nn.Module):
    """Pre-activation DenseNet-BC layer: BN-ReLU-Conv1x1 (b*g) -> BN-ReLU-Conv3x3 (g)."""

    def __init__(self, in_channels: int, growth_rate: int, neck_size: int):
        super().__init__()
        self.norm1 = BatchNorm2d(in_channels)
        self.conv1 = _conv1x1(in_channels, neck_size * growth_rate)
        self.norm2 = BatchNorm2d(neck_size * growth_rate)
        self.conv2 = nn.Conv2d(
            neck_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False
        )

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        bottleneck = concat_bn_relu_conv(inputs, self.norm1, self.conv1)
        return self.conv2(F.relu(self.norm2(bottleneck), inplace=True))


class DenseBlock(nn.Module):
    """One U-Net position (resolution level) for all N U-Nets; U-Net i uses index i.

    `in_channels` is the width of the position's own input (c0, or 2*c0 for up
    positions, which take [upsampled, skip]); U-Net i also sees the g-channel new
    features of the previous min(i, K) U-Nets at this position.
    """

    def __init__(self, cfg: CUNetConfig, in_channels: int, requires_skip: bool):
        super().__init__()
        n, k, g = cfg.num_unets, cfg.order, cfg.growth_rate
        layer_in = [in_channels + min(i, k) * g for i in range(n)]
        self.layers = nn.ModuleList(DenseLayer(c, g, cfg.neck_size) for c in layer_in)
        self.adapters_ahead = nn.ModuleList(Adapter(c + g, cfg.width) for c in layer_in)
        if requires_skip:
            self.adapters_skip = nn.ModuleList(Adapter(c + g, cfg.width) for c in layer_in)
        self.requires_skip = requires_skip
        self.order = k

    def forward(
        self,
        x: list[torch.Tensor],
        i: int,
        fifo: list[torch.Tensor],
        memory_efficient: bool = False,
        upsample_first: bool = False,
        pool_ahead: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Run U-Net i at this position; `fifo` holds earlier U-Nets' new features and is
        updated in place. Returns (ahead,) or (ahead, skip).

        The upsampling before an up position and the pooling after a down position
        happen in here, so the memory-efficient mode recomputes the position as a
        whole and keeps only its outputs, never the full-resolution intermediates.
        """
        num_x = len(x)

        def position(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            xs = list(tensors[:num_x])
            if upsample_first:
                xs[0] = F.interpolate(xs[0], scale_factor=2.0, mode="nearest")
            inputs = xs + list(tensors[num_x:])
            new_features = self.layers[i](inputs)
            inputs = inputs + [new_features]
            ahead = self.adapters_ahead[i](inputs)
            if pool_ahead:
                ahead = F.max_pool2d(ahead, kernel_size=2, stride=2)
            if self.requires_skip:
                return new_features, ahead, self.adapters_skip[i](inputs)
            return new_features, ahead

        outputs = recomputed(position, *x, *fifo) if memory_efficient else position(*x, *fifo)
        fifo.append(outputs[0])
        del fifo[: max(0, len(fifo) - self.order)]
        return outputs[1:]


class UNetStack(nn.Module):
    """The down, neck and up blocks shared by all N U-Nets (the authors' `hg`)."""

    def __init__(self, cfg: CUNetConfig):
        super().__init__()
        c0 = cfg.width
        self.down_blocks = nn.ModuleList(DenseBlock(cfg, c0, True) for _ in range(NUM_LEVELS))
        self.up_blocks = nn.ModuleList(DenseBlock(cfg, 2 * c0, False) for _ in range(NUM_LEVELS))
        self.neck_block = DenseBlock(cfg, c0, False)

    def forward(self, x: torch.Tensor, i: int, fifos: dict, memory_efficient: bool) -> torch.Tensor:
        skips = []
        for j, block in enumerate(self.down_blocks):
            x, skip = block([x], i, fifos.setdefault(("down", j), []), memory_efficient,
                            pool_ahead=True)
            skips.append(skip)
        (x,) = self.neck_block([x], i, fifos.setdefault(("neck", 0), []), memory_efficient)
        for j in reversed(range(NUM_LEVELS)):
            (x,) = self.up_blocks[j]([x, skips[j]], i, fifos.setdefault(("up", j), []),
                                     memory_efficient, upsample_first=True)
        return x


class IntermediaBlock(nn.Module):
    """Adapters between U-Nets: U-Net i >= 1 gets BN-ReLU-Conv1x1 over
    [output of U-Net i-1, inputs of the previous min(i, K) U-Nets]."""

    def __init__(self, cfg: CUNetConfig):
        super().__init__()
        c0, k = cfg.width, cfg.order
        self.adapters = nn.ModuleList(
            Adapter(c0 + min(i, k) * c0, c0) for i in range(1, cfg.num_unets)
        )


class Head(nn.Module):
    """BN -> ReLU -> Conv1x1 (c0 -> C): a supervised heatmap head (the authors' `linears`)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.norm = BatchNorm2d(in_channels)
        self.conv = _conv1x1(in_channels, num_classes)

    def forward(self, x: torch.Tensor, memory_efficient: bool = False) -> torch.Tensor:
        return concat_bn_relu_conv([x], self.norm, self.conv, memory_efficient)


class CUNet(nn.Module):
    """CU-Net. forward(x: Bx3x256x256 in [0,1]) -> list of L*R heatmaps (BxCx64x64),
    one per supervised U-Net in order; the last is the prediction."""

    def __init__(self, config: CUNetConfig, memory_efficient: bool = False):
        super().__init__()
        self.config = config
        self.memory_efficient = memory_efficient
        c0 = config.width
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(3, c0, kernel_size=7, stride=2, padding=3, bias=False),
                norm0=BatchNorm2d(c0),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(kernel_size=2, stride=2),
            )
        )
        self.hg = UNetStack(config)
        # All N heads are stored, as in the authors' checkpoints, even when L < N.
        self.linears = nn.ModuleList(Head(c0, config.num_classes) for _ in range(config.num_unets))
        self.intermedia = IntermediaBlock(config)
        if config.refine_iters > 1:
            # Passes after the first see a full FIFO of K earlier inputs already at
            # positions 0..K-1, which the first pass's adapters are too narrow for.
            k = config.order
            self.refine_adapters = nn.ModuleList(
                Adapter(c0 + k * c0, c0) for _ in range(max(k, 1))
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The authors' init: conv U(+-1/sqrt(fan_in)); BN gamma U(0,1), beta 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.kernel_size[0] * m.kernel_size[1] * m.in_channels
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(m.weight, -bound, bound)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _between_unets_adapter(self, r: int, i: int) -> Adapter:
        if r > 0 and i < max(self.config.order, 1):
            return self.refine_adapters[i]
        return self.intermedia.adapters[i - 1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.config
        efficient = self.memory_efficient and self.training and torch.is_grad_enabled()
        anchors = set(cfg.loss_anchors)
        x = recomputed(self.features, x) if efficient else self.features(x)
        unet_inputs: list[torch.Tensor] = []  # the last K U-Nets' inputs (stem output first)
        heads = []
        for r in range(cfg.refine_iters):
            fifos: dict = {}  # dense-link FIFOs restart each pass: widths match pass 0
            for i in range(cfg.num_unets):
                if r > 0 or i > 0:
                    x = self._between_unets_adapter(r, i)([x] + unet_inputs, efficient)
                unet_inputs.append(x)
                del unet_inputs[: max(0, len(unet_inputs) - cfg.order)]
                x = self.hg(x, i, fifos, efficient)
                if i + 1 in anchors:
                    heads.append(self.linears[i](x, efficient))
        return heads


# --------------------------------------------------------------------------------------
# Registry of named configurations


@dataclass(frozen=True)
class ModelEntry:
    name: str
    config: CUNetConfig
    description: str
    tags: tuple[str, ...] = field(default_factory=tuple)


MODEL_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config: CUNetConfig, description: str, *tags: str) -> None:
    MODEL_REGISTRY[name] = ModelEntry(name, config, description, tags)


register_model(
    "cunet-face-n8k1",
    CUNetConfig(num_unets=8, order=1, num_classes=68),
    "the authors' 300-W face model (68 points)",
    "paper",
)
register_model(
    "cunet-pose-n16k1",
    CUNetConfig(num_unets=16, order=1, num_classes=16),
    "the authors' MPII pose model (16 joints)",
    "paper",
)
# Small enough to train on a 2-core CPU in well under an hour; the embedded default.
register_model(
    "cunet-face-small",
    CUNetConfig(num_unets=2, order=1, num_classes=68, width=32, growth_rate=16),
    "small face model for CPU training; the embedded default's configuration",
    "default",
)
register_model(
    "cunet-pose-small",
    CUNetConfig(num_unets=2, order=1, num_classes=16, width=32, growth_rate=16),
    "small pose model for CPU training (16 MPII joints), the face default's shape",
)
DEFAULT_CONFIG_NAME = "cunet-face-small"


def registered_names() -> Iterable[str]:
    return MODEL_REGISTRY.keys()
