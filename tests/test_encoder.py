"""The factorized space-time encoder: shapes of every variant, visible-token selection, input checks."""
import dataclasses

import pytest
import torch

from pretrain.encoder import ENCODER_VARIANTS, EncoderConfig, SpaceTimeEncoder, encoder_config


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU may be shared with other jobs


@pytest.mark.parametrize("variant", sorted(ENCODER_VARIANTS))
def test_every_variant_output_shapes(variant):
    cfg = encoder_config(variant)
    if variant == "base":  # a single clip, no backward; skip the (slow) initialisation of 115 M parameters
        with torch.device("meta"):
            encoder = SpaceTimeEncoder(cfg)
        encoder = encoder.to_empty(device="cpu").eval()
        with torch.no_grad():
            for param in encoder.parameters():
                param.normal_(0.0, 0.02)
    else:
        encoder = SpaceTimeEncoder(cfg).eval()
    batch = 1 if variant == "base" else 2
    clip = torch.randn(batch, cfg.num_frames, cfg.in_chans, cfg.img_size, cfg.img_size).to(torch.bfloat16)  # frames are stored bf16
    p = (cfg.img_size // cfg.patch_size) ** 2
    assert encoder.num_patches == p
    with torch.inference_mode():
        tokens = encoder.forward_features(clip)
        pooled = encoder(clip)
    assert tokens.shape == (batch, cfg.num_frames, p, cfg.embed_dim) and tokens.dtype == torch.float32
    assert pooled.shape == (batch, cfg.embed_dim)
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(pooled, tokens.mean(dim=(1, 2)))


def test_base_is_vit_b():
    cfg = ENCODER_VARIANTS["base"]
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.patch_size, cfg.img_size, cfg.num_frames) == (12, 768, 12, 16, 224, 10)


def test_visible_tokens_keep_their_positions():
    """Position embeddings are added before the visible patches are picked: any subset or order of
    patches gives the tokens of those patches (attention is permutation-equivariant)."""
    encoder = SpaceTimeEncoder(encoder_config("tiny")).eval()
    cfg = encoder.cfg
    clip = torch.randn(2, 4, cfg.in_chans, cfg.img_size, cfg.img_size)
    all_patches = torch.arange(encoder.num_patches).expand(2, -1)
    with torch.no_grad():
        full = encoder.forward_features(clip)
        torch.testing.assert_close(encoder.forward_features(clip, all_patches), full)
        perm = torch.stack([torch.randperm(encoder.num_patches) for _ in range(2)])
        shuffled = encoder.forward_features(clip, perm)
    expected = torch.stack([full[b][:, perm[b]] for b in range(2)])
    torch.testing.assert_close(shuffled, expected, atol=1e-5, rtol=1e-5)


def test_attention_is_divided_space_then_time():
    """A change in one patch of one frame reaches, after one block, the same patch in every frame (temporal
    attention) and other patches of every frame (spatial attention after temporal): two blocks mix all."""
    encoder = SpaceTimeEncoder(encoder_config("tiny", depth=1)).eval()
    cfg = encoder.cfg
    clip = torch.randn(1, 5, cfg.in_chans, cfg.img_size, cfg.img_size)
    changed = clip.clone()
    changed[0, 2, :, :cfg.patch_size, :cfg.patch_size] += 3.0  # patch 0 of frame 2
    with torch.no_grad():
        diff = (encoder.forward_features(changed) - encoder.forward_features(clip)).abs().amax(-1)  # (1, T, P)
    assert (diff > 1e-6).all()  # temporal then spatial attention: every token of every frame moved


def test_fewer_frames_and_training_backward():
    encoder = SpaceTimeEncoder(encoder_config("tiny", drop_path=0.1)).train()
    cfg = encoder.cfg
    clip = torch.randn(3, 4, cfg.in_chans, cfg.img_size, cfg.img_size)  # T = 4 <= num_frames
    out = encoder(clip)
    assert out.shape == (3, cfg.embed_dim)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    assert encoder.pos_embed_time.grad[:, 4:].abs().sum() == 0  # frames past T do not take part


def test_clear_errors():
    encoder = SpaceTimeEncoder(encoder_config("tiny"))
    cfg = encoder.cfg
    with pytest.raises(ValueError, match=r"\(6, 32, 32\) do not match"):
        encoder(torch.randn(1, 2, 6, 32, 32))
    with pytest.raises(ValueError, match="1..10"):
        encoder(torch.randn(1, 11, cfg.in_chans, cfg.img_size, cfg.img_size))
    with pytest.raises(ValueError, match="unknown encoder variant 'huge'"):
        encoder_config("huge")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['dept'\]"):
        encoder_config("tiny", dept=3)
    with pytest.raises(ValueError, match="not a multiple"):
        EncoderConfig(img_size=30, patch_size=8)


def test_overrides_and_dict_config():
    cfg = encoder_config("cpu", depth=6)
    assert cfg.depth == 6 and cfg.embed_dim == ENCODER_VARIANTS["cpu"].embed_dim
    assert ENCODER_VARIANTS["cpu"].depth == 4  # the registry is not modified
    encoder = SpaceTimeEncoder(dataclasses.asdict(cfg))  # as read from a checkpoint's config.json
    assert len(encoder.blocks) == 6
