"""factory.families: every family builds and trains on every modality it supports at its smallest and
largest size, draws only sizes it can build, refuses the others naming the field, is a causal LM on
text, and is watched by the zero-config capture (three hook points, a linear head, finite varying frames)."""
import warnings

import numpy as np
import pytest
import torch

from capture.recorder import CaptureConfig, attach
from factory.datasets import OFFLINE, dataset_info
from factory.families import (
    ACTS,
    FAMILIES,
    MODALITIES,
    NORMS,
    FamilyError,
    InputShape,
    Size,
    build_family,
    loss_of,
    random_batch,
    stage_depths,
)

# the shapes of the built-in datasets, per modality (images at their natural 1-channel 16 / 24 px and
# 3-channel 32 px)
DATA_SHAPES: dict[str, list[InputShape]] = {}
for _name in OFFLINE:
    _info = dataset_info(_name)
    _shape = InputShape(_info.modality, _info.dims, _info.num_classes)
    if _shape not in DATA_SHAPES.setdefault(_info.modality, []):
        DATA_SHAPES[_info.modality].append(_shape)
SMALL = {"image": InputShape("image", (1, 16), 10), "tabular": InputShape("tabular", (16,), 6),
         "sequence": InputShape("sequence", (40, 1), 10), "text": InputShape("text", (32,), 98)}
LARGE = {"image": InputShape("image", (3, 32), 6), "tabular": InputShape("tabular", (32,), 4),
         "sequence": InputShape("sequence", (64, 3), 8), "text": InputShape("text", (32,), 98)}
PAIRS = [(f, m) for f, fam in FAMILIES.items() for m in fam.modalities]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_registry_covers_the_families_the_corpus_needs():
    assert len(FAMILIES) >= 18
    plain = {"mlp", "resmlp", "cnn", "gn_cnn", "conv1d", "rnn", "gru", "lstm", "transformer"}
    timm_families = {"resnet", "convnext", "vit", "deit", "swin", "mixer", "efficientnet", "densenet", "mobilenetv3",
                     "regnet"}
    assert plain | timm_families <= set(FAMILIES)
    assert {FAMILIES[f].source for f in plain} == {"torch"} and {FAMILIES[f].source for f in timm_families} == {"timm"}
    assert sum(f.source == "torchvision" for f in FAMILIES.values()) >= 2
    for modality in MODALITIES:
        assert sum(modality in f.modalities for f in FAMILIES.values()) >= 3, modality
    for fam in FAMILIES.values():
        assert set(fam.norms) <= set(NORMS) and set(fam.acts) <= set(ACTS) and fam.lr_scale > 0
        assert set(fam.modalities) <= set(MODALITIES)


def _train_two_steps(model: torch.nn.Module, shape: InputShape) -> torch.Tensor:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = random_batch(shape, 8, gen)
        out = model(x)
        loss = loss_of(out, y)
        assert torch.isfinite(loss), float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


@pytest.mark.parametrize("family,modality", PAIRS)
def test_builds_and_trains_at_smallest_and_largest_size(family, modality):
    fam = FAMILIES[family]
    for size, shape in ((fam.smallest(), SMALL[modality]), (fam.largest(), LARGE[modality])):
        torch.manual_seed(0)
        model = fam.build(shape, size)
        out = _train_two_steps(model, shape)
        want = (8, shape.dims[0], shape.num_classes) if modality == "text" else (8, shape.num_classes)
        assert tuple(out.shape) == want, (size, shape)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_draws_pass_check_on_every_dataset_shape(family):
    fam = FAMILIES[family]
    rng = np.random.default_rng(0)
    sizes = {fam.draw_size(rng) for _ in range(60)}
    assert len(sizes) > 1  # a distribution, not one size
    for size in sizes:
        assert size.width in fam.widths and size.depth in fam.depths and size.norm in fam.norms
        for modality in fam.modalities:
            for shape in DATA_SHAPES[modality]:
                fam.check(shape, size)  # raises FamilyError when a draw cannot be built


@pytest.mark.parametrize("family,modality", PAIRS)
def test_every_norm_act_and_residual_choice_builds(family, modality):
    fam = FAMILIES[family]
    shape = SMALL[modality]
    median = fam.median()
    for field, choices in (("norm", fam.norms), ("act", fam.acts), ("residual", fam.residuals)):
        for choice in choices[1:]:
            size = Size(**{**median.__dict__, field: choice})
            torch.manual_seed(0)
            x, _ = random_batch(shape, 4, torch.Generator().manual_seed(0))
            assert torch.isfinite(fam.build(shape, size)(x)).all(), size


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_whatever_check_accepts_builds(family):
    """Sizes between the drawn ones (any width and depth in range that check lets through) build and run."""
    fam = FAMILIES[family]
    rng = np.random.default_rng(1)
    widths = [w for w in range(min(fam.widths), max(fam.widths) + 1) if w % fam.width_multiple == 0]
    for _ in range(4):
        size = Size(int(rng.choice(widths)), int(rng.integers(min(fam.depths), max(fam.depths) + 1)),
                    str(rng.choice(fam.norms)), str(rng.choice(fam.acts)), bool(rng.choice(fam.residuals)))
        for modality in fam.modalities:
            shape = SMALL[modality]
            fam.check(shape, size)
            torch.manual_seed(0)
            x, _ = random_batch(shape, 4, torch.Generator().manual_seed(0))
            assert torch.isfinite(fam.build(shape, size)(x)).all(), size


def _refusal(family: str, shape: InputShape, size: Size) -> str:
    with pytest.raises(FamilyError) as err:
        FAMILIES[family].check(shape, size)
    return str(err.value)


def test_check_refuses_bad_sizes_naming_the_field():
    image = InputShape("image", (3, 32), 10)
    tr = FAMILIES["transformer"].median()
    seq = InputShape("sequence", (64, 3), 8)
    cases = [
        ("transformer", seq, Size(41, tr.depth, tr.norm, tr.act, tr.residual), "width", "multiple of 2"),
        ("transformer", seq, Size(256, tr.depth, tr.norm, tr.act, tr.residual), "width", "outside"),
        ("transformer", seq, Size(tr.width, 2, tr.norm, tr.act, tr.residual), "depth", "outside"),
        ("transformer", seq, Size(tr.width, tr.depth, "batch", tr.act, tr.residual), "norm", "'batch'"),
        ("transformer", image, tr, "modality", "'image'"),
        ("cnn", image, Size(8, 3, "group", "relu", False), "norm", "'group'"),
        ("cnn", image, Size(8, 3, "batch", "relu", True), "residual", "True"),
        ("gru", seq, Size(32, 1, "layer", "relu", False), "act", "'relu'"),
        ("resnet", InputShape("image", (3, 8), 10), FAMILIES["resnet"].median(), "dims", "too small"),
        ("vit", InputShape("image", (3, 18), 10), FAMILIES["vit"].median(), "dims", "multiple of 4"),
        ("mlp", InputShape("image", (3,), 10), FAMILIES["mlp"].median(), "dims", "(C, S)"),
        ("mlp", InputShape("tabular", (16,), 1), FAMILIES["mlp"].median(), "num_classes", ">= 2"),
    ]
    for family, shape, size, field, why in cases:
        msg = _refusal(family, shape, size)
        assert f"family {family!r}: {field}:" in msg and why in msg, msg
    with pytest.raises(FamilyError, match="unknown family 'alexnet'.*cnn"):
        build_family("alexnet", image, FAMILIES["cnn"].median())
    with pytest.raises(FamilyError, match="too small"):  # build checks first
        FAMILIES["cnn"].build(InputShape("image", (1, 4), 10), FAMILIES["cnn"].largest())


def test_stage_depths_spread_blocks_over_stages():
    assert stage_depths(3, 3) == (1, 1, 1) and stage_depths(4, 3) == (1, 2, 1) and stage_depths(6, 3) == (2, 2, 2)
    for depth in range(4, 9):
        d = stage_depths(depth, 4)
        assert sum(d) == depth and min(d) >= 1 and max(d) - min(d) <= 1


@pytest.mark.parametrize("family", [f for f, fam in FAMILIES.items() if "text" in fam.modalities])
def test_text_models_are_causal(family):
    """Changing token t changes no logit before t (eval mode: BatchNorm's batch statistics aside)."""
    fam = FAMILIES[family]
    shape = InputShape("text", (32,), 98)
    torch.manual_seed(0)
    model = fam.build(shape, fam.largest()).eval()
    x = torch.randint(0, 98, (2, 32), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 98
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)
    assert not torch.allclose(a[:, 20:], b[:, 20:], atol=1e-5)
    assert model(x[:, :10]).shape == (2, 10, 98)  # shorter windows than the context


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_attaches_with_zero_config(family):
    fam = FAMILIES[family]
    modality = fam.modalities[0]
    shape = DATA_SHAPES[modality][0]
    torch.manual_seed(0)
    model = fam.build(shape, fam.smallest())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "no head" / "absent maps" / fault warnings
        cap = attach(model, CaptureConfig(cadence=1, frame_size=32))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            x, y = random_batch(shape, 8, gen)
            loss = loss_of(model(x), y)
            opt.zero_grad()
            loss.backward()
            cap.step(loss)
            opt.step()
    cap.remove()
    names = [p.name for p in cap.points]
    assert len(set(names)) == 3, names
    assert isinstance(cap.head, torch.nn.Linear) and cap.head.out_features == shape.num_classes
    assert not cap.faults, cap.faults
    frames = torch.stack([f.frame.float() for f in cap.frames])  # (T, 6, S, S)
    assert len(frames) == 4 and all(f.complete for f in cap.frames)
    assert torch.isfinite(frames).all()
    assert (frames.transpose(0, 1).flatten(1).std(dim=1) > 0).all(), "every channel varies"
