"""Hook points for every supported family, and captured gradients = autograd of the captured outputs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import capture
from capture.frames import Projection, RobustNormalizer, tensor_to_map
from capture.hookpoints import HookPointError, find_hook_points, pick_depths
from capture.lm import lm_loss
from zoo import IMAGE_FAMILIES, tiny_lm

S = 16


def _batch(family):
    if family == "lm":
        tokens = torch.randint(0, 20, (4, 13))
        return tiny_lm(), tokens[:, :-1], tokens[:, 1:], lm_loss
    return IMAGE_FAMILIES[family](), torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)), F.cross_entropy


def test_pick_depths():
    assert pick_depths(12) == [2, 5, 8]  # ViT-B: blocks 3, 6, 9 of 12
    assert pick_depths(8) == [1, 3, 5]
    assert pick_depths(4) == [0, 1, 2]
    assert pick_depths(2) == [0, 0, 1]


@pytest.mark.parametrize("family", sorted(IMAGE_FAMILIES) + ["lm"])
def test_hook_points_and_gradients_match_autograd(family):
    model, x, y, loss_fn = _batch(family)
    model.train()
    head = capture.find_head(model)
    if head is not None and not head.weight.any():  # timm's MLP-Mixer zero-initialises its head,
        torch.nn.init.normal_(head.weight, std=0.1)  # which leaves no gradient for the backbone
    with capture.attach(model, cadence=1, frame_size=S) as cap:
        assert [p.position for p in cap.points] == ["early", "mid", "late"]
        assert len({p.name for p in cap.points}) == 3, "three distinct hook points"
        # Reference, independent of capture's tensor hooks: a later forward hook routes each hooked
        # output through `pre` (kept, never modified: the block's in-place `+=` / ReLU hit a second
        # clone) and autograd gives d loss / d pre.
        acts, outs = {}, {}

        def ref_hook(i):
            def hook(module, args, output):
                t = output[0] if isinstance(output, tuple) else output
                acts[i] = t.detach().clone()
                outs[i] = t * 1.0
                passed = outs[i].clone()
                return (passed,) + tuple(output[1:]) if isinstance(output, tuple) else passed
            return hook

        handles = [p.module.register_forward_hook(ref_hook(i)) for i, p in enumerate(cap.points)]
        loss = loss_fn(model(x), y)
        ref_grads = torch.autograd.grad(loss, [outs[i] for i in range(3)], retain_graph=True)
        loss.backward()
        frame = cap.step(loss)
        for h in handles:
            h.remove()

    assert frame.frame.shape == (6, S, S) and frame.frame.dtype == torch.bfloat16
    assert torch.isfinite(frame.frame.float()).all()
    assert cap.faults == []
    proj = Projection.mean(8)
    maps = [tensor_to_map(acts[i], p.layout, S, proj, p.prefix_tokens)[0] for i, p in enumerate(cap.points)]
    maps += [tensor_to_map(ref_grads[i], p.layout, S, proj, p.prefix_tokens)[0] for i, p in enumerate(cap.points)]
    for i, m in enumerate(maps[3:]):
        assert m.abs().sum() > 0, f"gradient map {i} is all zero: the output is not on the loss path"
    expected = RobustNormalizer(1)(torch.stack(maps)).to(torch.bfloat16)
    torch.testing.assert_close(frame.frame.float(), expected.float(), atol=0.02, rtol=0.02)
    if family != "deit_distilled":  # its classifier is a pair of heads; the main one is used
        assert frame.readouts["head_grad_norm"] > 0


def test_named_modules_and_patterns():
    model = IMAGE_FAMILIES["vit"]()
    pts = find_hook_points(model, modules=["blocks.0.attn", "blocks.1.attn", "blocks.3.attn"])
    assert [p.name for p in pts] == ["blocks.0.attn", "blocks.1.attn", "blocks.3.attn"]
    assert all(p.layout == "auto" and p.prefix_tokens == 1 for p in pts)
    with capture.attach(model, modules=["blocks.*.attn"], cadence=1, frame_size=S) as cap:
        loss = F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
        loss.backward()
        assert cap.step(loss).frame.shape == (6, S, S) and not cap.faults
    pts = find_hook_points(model, modules=["blocks.*.mlp"])
    assert [p.name for p in pts] == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]  # 25/50/75% of 4


def test_no_hook_points_error_names_the_model_and_the_fix():
    frozen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).requires_grad_(False)
    with pytest.raises(HookPointError, match=r"torch\.nn\.modules\.container\.Sequential has no parameter that requires grad"):
        capture.attach(frozen)
    backbone = IMAGE_FAMILIES["resnet"]().requires_grad_(False)
    backbone.get_classifier().requires_grad_(True)  # a frozen backbone: only the head trains
    with pytest.raises(HookPointError, match=r"timm\.models\.resnet\.ResNet.*frozen backbone.*modules=\["):
        capture.attach(backbone)
    with pytest.raises(HookPointError, match="matches 0 module"):
        find_hook_points(frozen, modules=["nothing.*"])
    with pytest.raises(HookPointError, match="no module of Sequential matches"):
        find_hook_points(frozen, modules=["0", "1", "nope"])
    with pytest.raises(HookPointError, match="expected a torch.nn.Module"):
        find_hook_points(lambda x: x)


def test_removal_detaches_every_hook():
    from capture import hooks

    model = IMAGE_FAMILIES["resnet"]()
    cap = capture.attach(model, cadence=1)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # the model itself carries no hook
    assert sum(hooks.active(m) for m in model.modules()) == 5  # 3 points, the head, the input (batch_repeat): in capture.hooks
    cap.remove()
    assert sum(hooks.active(m) for m in model.modules()) == 0 and hooks.active() == 0
