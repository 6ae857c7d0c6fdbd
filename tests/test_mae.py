"""Dynamics-MAE: tube masks, visible-only encoding, a loss on masked patches only (against a naive
reference), patch order shared with the encoder, gradients everywhere. (The loss going down on real
clips is tested end to end in test_pretrain_run.py.)"""
import pytest
import torch
from einops import rearrange

from pretrain.encoder import encoder_config
from pretrain.mae import DynamicsMAE, tube_mask


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU may be shared with other jobs


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DynamicsMAE(encoder_config("tiny"), decoder_dim=32, decoder_depth=2, decoder_heads=1, mask_ratio=0.75)


def _clip(model, batch=2, frames=4):
    cfg = model.encoder.cfg
    return torch.randn(batch, frames, cfg.in_chans, cfg.img_size, cfg.img_size)


@pytest.mark.parametrize("num_patches,ratio", [(16, 0.9), (16, 0.75), (196, 0.9), (16, 0.5), (16, 0.99)])
def test_tube_mask_ratio_and_partition(num_patches, ratio):
    keep, masked = tube_mask(64, num_patches, ratio, generator=torch.Generator().manual_seed(1))
    n_mask = min(round(ratio * num_patches), num_patches - 1)  # 0.99 of 16 -> 15: one patch stays visible
    assert keep.shape == (64, num_patches - n_mask) and masked.shape == (64, n_mask)
    assert keep.dtype == masked.dtype == torch.long
    both = torch.cat([keep, masked], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(num_patches).expand(64, -1))  # a partition of the patches
    assert torch.equal(keep, keep.sort(dim=1).values)
    assert len({tuple(k.tolist()) for k in keep}) > 1  # clips get different masks
    again, _ = tube_mask(64, num_patches, ratio, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, keep)


def test_tube_mask_rejects_bad_ratio():
    with pytest.raises(ValueError, match="ratio"):
        tube_mask(2, 16, 1.0)
    with pytest.raises(ValueError, match="masks no patch"):
        DynamicsMAE(encoder_config("tiny"), mask_ratio=0.01)


def test_same_patches_masked_in_every_frame(model):
    """The encoder sees only the visible tube: changing masked patches (in any frame) leaves its tokens
    unchanged; changing a visible patch in one frame does not."""
    model.eval()
    clip = _clip(model)
    keep, masked = tube_mask(2, model.encoder.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = model.forward_encoder(clip, keep)
        assert latent.shape == (2, 4, keep.shape[1], model.encoder.cfg.embed_dim)
        patches = model.patchify(clip)  # (B, T, P, p*p*C)
        noisy = patches.clone()
        for b in range(2):
            noisy[b, :, masked[b]] += 5 * torch.randn_like(noisy[b, :, masked[b]])  # all frames of every masked tube
        torch.testing.assert_close(model.forward_encoder(model.unpatchify(noisy), keep), latent)
        one = patches.clone()
        one[0, 3, keep[0, 0]] += 5.0  # one visible patch of one frame
        assert not torch.allclose(model.forward_encoder(model.unpatchify(one), keep), latent)


def test_loss_touches_only_masked_patches(model):
    clip = _clip(model)
    keep, masked = tube_mask(2, model.encoder.num_patches, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = model.forward_decoder(model.forward_encoder(clip, keep), keep)
    target = clip.clone().requires_grad_(True)
    loss = model.forward_loss(target, pred, masked)
    loss.backward()
    grad = model.patchify(target.grad).abs().amax(-1)  # (B, T, P)
    for b in range(2):
        assert (grad[b][:, keep[b]] == 0).all()  # no frame of a visible patch contributes
        assert (grad[b][:, masked[b]] > 0).all()  # every frame of every masked tube does
    changed = model.patchify(clip)
    for b in range(2):
        changed[b, :, keep[b]] = torch.randn_like(changed[b, :, keep[b]])
    assert model.forward_loss(model.unpatchify(changed), pred, masked) == loss


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_naive_reference(model, norm_pix):
    model.norm_pix_loss = norm_pix
    clip = _clip(model)
    out = model(clip, generator=torch.Generator().manual_seed(3))
    p, c = model.patch_size, model.encoder.cfg.in_chans
    side = model.encoder.cfg.img_size // p
    errors = []
    for b in range(clip.shape[0]):
        for t in range(clip.shape[1]):
            for j in out.masked[b].tolist():
                row, col = divmod(j, side)
                pixels = clip[b, t, :, row * p:(row + 1) * p, col * p:(col + 1) * p]  # (C, p, p)
                target = pixels.permute(1, 2, 0).reshape(-1)  # (p1 p2 c)
                if norm_pix:
                    target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                errors.append(((out.pred[b, t, j] - target) ** 2).mean())
    torch.testing.assert_close(out.loss, torch.stack(errors).mean())
    assert out.pred.shape == (2, 4, model.encoder.num_patches, p * p * c)


def test_patch_order_matches_the_encoder(model):
    """Patch j of `patchify` is the patch the encoder embeds as token j (its conv is a linear map of it)."""
    clip = _clip(model, frames=1)
    embed = model.encoder.patch_embed
    weight = rearrange(embed.proj.weight, "d c p1 p2 -> d (p1 p2 c)")
    expected = model.patchify(clip)[:, 0] @ weight.T + embed.proj.bias  # (B, P, D)
    torch.testing.assert_close(embed(clip[:, 0]), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.unpatchify(model.patchify(clip)), clip)


def test_every_parameter_gets_a_gradient(model):
    """DDP (without find_unused_parameters) needs every parameter in the graph; frames arrive as bf16."""
    out = model(_clip(model).to(torch.bfloat16))
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
