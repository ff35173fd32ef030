"""CU-Net as specified in docs/CUNET.md: structure, order-K links, heads, refinement,
memory-efficient training, and exact reproduction of the authors' outputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from cunet_optimize.errors import ConfigError
from cunet_optimize.models import CUNet, CUNetConfig, load_model


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_reproduces_authors_outputs(authors_fixture, memory_efficient):
    stem = authors_fixture / "cunet-n2-k1-c68-small"
    meta = json.loads(stem.with_suffix(".json").read_text())
    model = load_model(stem.with_suffix(".pth.tar"), memory_efficient=memory_efficient)
    assert model.config.to_dict() == dict(
        num_unets=2, order=1, num_classes=68, width=32, growth_rate=16, neck_size=4,
        num_heads=2, refine_iters=1,
    )
    assert sum(p.numel() for p in model.parameters()) == meta["num_parameters"]
    x = torch.from_numpy(np.load(stem.with_suffix(".input.npy")))
    expected = np.load(stem.with_suffix(".outputs.npy"))
    with torch.no_grad():
        heads = model.eval()(x)
    assert len(heads) == expected.shape[0]
    for got, want in zip(heads, expected):
        err = np.abs(got.numpy() - want).max()
        assert err < 1e-3, f"max abs error {err}"
        np.testing.assert_allclose(got.numpy(), want, **meta["numerics"]["suggested_tolerance"])


def test_channel_widths_follow_order_k():
    cfg = CUNetConfig(num_unets=4, order=2, num_classes=5, width=8, growth_rate=4, neck_size=2)
    m = CUNet(cfg)
    c0, g = 8, 4
    for i in range(4):
        k = min(i, 2)
        assert m.hg.down_blocks[0].layers[i].norm1.num_features == c0 + k * g
        assert m.hg.neck_block.layers[i].norm1.num_features == c0 + k * g
        assert m.hg.up_blocks[3].layers[i].norm1.num_features == 2 * c0 + k * g
        # the adapters also see the new features of this U-Net
        assert m.hg.down_blocks[1].adapters_skip[i].adapter_norm.num_features == c0 + k * g + g
        assert m.hg.up_blocks[0].adapters_ahead[i].adapter_conv.out_channels == c0
    # between U-Nets: output of U-Net i-1 + the inputs of the previous min(i, K) U-Nets
    assert [a.adapter_norm.num_features for a in m.intermedia.adapters] == [16, 24, 24]
    assert m.hg.down_blocks[0].layers[0].conv1.out_channels == 2 * g


def test_output_shapes_and_heads():
    m = CUNet(tiny_config(num_unets=3, num_heads=3)).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 256, 256))
    assert len(out) == 3 and all(o.shape == (2, 4, 64, 64) for o in out)


def test_loss_anchors_round_halves_up_like_python2():
    assert CUNetConfig(num_unets=8, order=1, num_heads=3).loss_anchors == [3, 5, 8]
    # 5/2 = 2.5: Python 2 (the authors) -> 3; Python 3's round() would give 2
    assert CUNetConfig(num_unets=5, order=1, num_heads=2).loss_anchors == [3, 5]
    assert CUNetConfig(num_unets=4, order=0).loss_anchors == [1, 2, 3, 4]


def test_heads_use_the_anchor_unets():
    m = CUNet(tiny_config(num_unets=4, num_heads=2)).eval()  # anchors 2, 4
    seen = []
    for i, head in enumerate(m.linears):
        head.register_forward_hook(lambda *a, i=i: seen.append(i))
    with torch.no_grad():
        m(torch.rand(1, 3, 256, 256))
    assert seen == [1, 3]


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(num_unets=2, order=2), "order K=2"),
        (dict(num_unets=2, order=1, num_heads=3), "num_heads"),
        (dict(num_unets=0), "num_unets"),
        (dict(num_unets=2, width=2.5), "integer"),
    ],
)
def test_invalid_configs_are_clear_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        CUNetConfig(**fields)


def test_order_zero_is_a_plain_stack():
    m = CUNet(tiny_config(num_unets=3, order=0))
    assert all(layer.norm1.num_features == 8 for layer in m.hg.down_blocks[2].layers)
    assert all(a.adapter_norm.num_features == 8 for a in m.intermedia.adapters)
    with torch.no_grad():
        assert len(m.eval()(torch.rand(1, 3, 256, 256))) == 3


def test_iterative_refinement_shares_weights_and_supervises_every_pass():
    base = CUNet(tiny_config(num_unets=2, order=1))
    refined = CUNet(tiny_config(num_unets=2, order=1, refine_iters=2))
    n_base = sum(p.numel() for p in base.parameters())
    n_refined = sum(p.numel() for p in refined.parameters())
    # only the wrap-around adapter is added: BN(2*c0) + Conv1x1(2*c0 -> c0)
    c0 = 8
    assert n_refined - n_base == 2 * (2 * c0) + (2 * c0) * c0
    refined.train()
    out = refined(torch.rand(2, 3, 256, 256))
    assert len(out) == 4  # L heads x R passes
    sum(o.square().mean() for o in out).backward()
    assert refined.refine_adapters[0].adapter_conv.weight.grad.abs().sum() > 0
    # pass 2 reuses U-Net 0's weights: its gradient receives contributions from both passes
    assert refined.hg.down_blocks[0].layers[0].conv1.weight.grad is not None


def _train_step(model, x, target):
    model.train()
    model.zero_grad()
    out = model(x)
    loss = sum(((o - target) ** 2).mean() for o in out)
    loss.backward()
    return out, loss


def test_memory_efficient_mode_matches_plain_training_step():
    torch.manual_seed(0)
    plain = CUNet(tiny_config(num_unets=3, order=2))
    efficient = copy.deepcopy(plain)
    efficient.memory_efficient = True
    x = torch.rand(2, 3, 256, 256)
    target = torch.rand(2, 4, 64, 64)
    out_p, loss_p = _train_step(plain, x, target)
    out_e, loss_e = _train_step(efficient, x, target)
    for a, b in zip(out_p, out_e):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for (name, pa), (_, pb) in zip(plain.named_parameters(), efficient.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, ba), (_, bb) in zip(plain.named_buffers(), efficient.named_buffers()):
        # running statistics updated once per step, not once more in the recomputation
        torch.testing.assert_close(ba, bb, rtol=0, atol=1e-6, msg=name)
        if name.endswith("num_batches_tracked"):
            assert int(bb) == 1, name


def test_memory_efficient_mode_really_recomputes():
    """The efficient mode must keep fewer tensors for backward (here: count saved bytes)."""

    def saved_bytes(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.train()(torch.rand(2, 3, 256, 256))
        return total, out

    torch.manual_seed(0)
    plain = CUNet(tiny_config(num_unets=3, order=1))
    efficient = CUNet(tiny_config(num_unets=3, order=1), memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    b_plain, _ = saved_bytes(plain)
    b_eff, _ = saved_bytes(efficient)
    assert b_eff < 0.6 * b_plain
