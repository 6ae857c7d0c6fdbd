"""factory.datasets for the randomised corpus: `dataset_info` says what loading gives without loading;
images come at a requested channel count; the tabular, sequence and text datasets are built in,
standardised on their train split, deterministic per seed, and learnable in a factory-length run
without being solved at once."""
import functools

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from factory.datasets import (
    BUILTIN,
    DATASETS,
    INFO,
    OFFLINE,
    SINES_CLASSES,
    TEXT_DATASETS,
    TaskData,
    dataset_info,
    decode_chars,
    load_dataset,
    mnist1d_signals,
    stdlib_sources,
)
from factory.families import FAMILIES, InputShape, loss_of

NEW = ["tabular_blobs", "tabular_wide", "mnist1d_seq", "sines", "pysrc_chars"]


def _natural(name: str) -> dict:
    info = dataset_info(name)
    return {"image_size": info.dims[1], "channels": info.dims[0]} if info.modality == "image" else {}


@functools.lru_cache(maxsize=None)
def _load(name: str) -> TaskData:
    return load_dataset(name, **_natural(name))


def test_every_dataset_has_info_and_the_corpus_has_enough():
    assert set(INFO) == set(DATASETS)
    assert set(BUILTIN) < set(OFFLINE) and set(NEW) <= set(OFFLINE) and len(OFFLINE) >= 9
    modalities = [dataset_info(n).modality for n in OFFLINE]
    assert modalities.count("tabular") >= 2 and modalities.count("sequence") >= 2 and modalities.count("text") >= 2
    images = {dataset_info(n).dims for n in OFFLINE if dataset_info(n).modality == "image"}
    assert {c for c, _ in images} == {1, 3} and len({s for _, s in images}) >= 3  # channel counts and sizes
    assert {n for n in INFO if INFO[n].modality == "text"} == TEXT_DATASETS


@pytest.mark.parametrize("name", OFFLINE)
def test_info_agrees_with_the_loaded_data(name):
    info, d = dataset_info(name), _load(name)
    assert d.modality == info.modality and d.num_classes == info.num_classes
    if info.modality == "text":
        assert d.x_train.dtype == torch.int64 and d.x_train.ndim == 1 and int(d.x_train.max()) < info.num_classes
        assert d.y_train is None
        return
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val)):
        dims = (info.dims[0], info.dims[1], info.dims[1]) if info.modality == "image" else info.dims
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == dims and torch.isfinite(x).all()
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(info.num_classes))


def test_info_follows_the_params_that_change_it():
    assert dataset_info("shapes", num_classes=4).num_classes == 4
    assert dataset_info("sines", length=32).dims == (32, 3)
    assert load_dataset("sines", length=32, n_train=40, n_val=16).x_train.shape == (40, 32, 3)
    assert dataset_info("tabular_blobs", n_train=10) == dataset_info("tabular_blobs")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        dataset_info("imagenet")
    with pytest.raises(ValueError, match=r"unknown params \['colour'\].*num_classes"):
        dataset_info("shapes", colour="red")


def test_image_channels_on_request_and_three_by_default():
    assert load_dataset("digits", image_size=16).x_train.shape[1:] == (3, 16, 16)  # unchanged default
    grey = load_dataset("digits", image_size=16, channels=1)
    assert grey.x_train.shape[1:] == (1, 16, 16) and len(grey.meta["mean"]) == 1
    rgb = load_dataset("shapes", n_train=60, n_val=12, image_size=24)
    lum = load_dataset("shapes", n_train=60, n_val=12, image_size=24, channels=1)
    raw = rgb.x_train * torch.tensor(rgb.meta["std"]).view(1, 3, 1, 1) + torch.tensor(rgb.meta["mean"]).view(1, 3, 1, 1)
    expect = torch.einsum("nchw,c->nhw", raw, torch.tensor([0.299, 0.587, 0.114]))[:, None]
    got = lum.x_train * lum.meta["std"][0] + lum.meta["mean"][0]
    assert torch.allclose(got, expect, atol=1e-4)  # colour -> luminance, then standardised
    std, mean = torch.std_mean(lum.x_train)
    assert abs(float(mean)) < 1e-4 and abs(float(std) - 1) < 1e-3
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_dataset("digits", channels=2)
    with pytest.raises(ValueError, match="channels=1 given for 'sines', a sequence dataset"):
        load_dataset("sines", channels=1)


@pytest.mark.parametrize("name", ["tabular_blobs", "tabular_wide", "mnist1d_seq", "sines"])
def test_features_are_standardised_on_the_train_split(name):
    d = _load(name)
    axes = (0,) if d.modality == "tabular" else (0, 1)
    std, mean = torch.std_mean(d.x_train, dim=axes)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-5) and torch.allclose(std, torch.ones_like(std), atol=1e-4)
    val_mean = d.x_val.mean(dim=axes)
    assert not torch.allclose(val_mean, torch.zeros_like(val_mean), atol=1e-6)  # the val split is not re-centred


@pytest.mark.parametrize("name", ["tabular_blobs", "sines"])
def test_max_train_keeps_a_balanced_subset(name):
    d = load_dataset(name, max_train=60, max_val=30)
    counts = torch.bincount(d.y_train, minlength=d.num_classes)
    assert len(d.x_train) == 60 and len(d.x_val) == 30 and counts.max() - counts.min() <= 1


def test_mnist1d_seq_holds_the_mnist1d_signals():
    d = load_dataset("mnist1d_seq", seed=5, n_train=80, n_val=20)
    rng = np.random.default_rng([5, 0])  # the content stream of load_mnist1d / load_mnist1d_seq
    y = rng.permutation(np.arange(100) % 10)
    x = mnist1d_signals(y, 40, rng)[:80]
    assert d.y_train.tolist() == y[:80].tolist()
    raw = d.x_train[:, :, 0] * d.meta["std"][0] + d.meta["mean"][0]
    assert np.allclose(raw.numpy(), x, atol=1e-5)
    assert load_dataset("mnist1d", seed=5, n_train=80, n_val=20).y_train.tolist() == d.y_train.tolist()


def test_sines_classes_are_band_lag_and_chirp():
    assert len(SINES_CLASSES) == 8 == dataset_info("sines").num_classes
    d = load_dataset("sines", n_train=800, n_val=10, noise=0.0)
    x, y = d.x_train, d.y_train
    spectrum = torch.fft.rfft(x[:, :, 0], dim=1).abs()
    peak = spectrum[:, 1:].argmax(1) + 1  # cycles per window of the dominant component of channel 0
    assert peak[y % 2 == 0].float().mean() < peak[y % 2 == 1].float().mean()  # slow vs fast band
    # channel 1 leads channel 0 when x1[t] looks like x0[t + 1]
    leads = (x[:, :-1, 1] * x[:, 1:, 0]).mean(1) > (x[:, 1:, 1] * x[:, :-1, 0]).mean(1)
    assert leads[(y // 2) % 2 == 0].float().mean() > 0.9 and (~leads[(y // 2) % 2 == 1]).float().mean() > 0.9
    raw = x[:, :, 0] * d.meta["std"][0] + d.meta["mean"][0]
    crossings = (torch.sign(raw[:, 1:]) != torch.sign(raw[:, :-1])).float()  # (N, T - 1)
    half = crossings.shape[1] // 2
    up = crossings[:, half:].sum(1) > crossings[:, :half].sum(1)  # faster in the second half
    assert up[y // 4 == 0].float().mean() > 0.8 and (~up[y // 4 == 1]).float().mean() > 0.8


def test_pysrc_chars_is_the_standard_library_source():
    d = load_dataset("pysrc_chars", max_chars=200_000)
    files = stdlib_sources(200_000)
    assert d.meta["files"] == [f.name for f in files] == sorted(f.name for f in files)
    full = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    assert abs(len(d.x_train) / len(full) - 0.9) < 1e-3 and len(d.x_train) + len(d.x_val) == len(full)
    text = decode_chars(d.x_train[:50_000])
    assert "def " in text and "import " in text
    assert sum(f.stat().st_size for f in files) <= 200_000 or len(files) == 1


def _train(name: str, family: str, steps: int, lr: float = 2e-3) -> tuple[float, float]:
    """Validation accuracy of `family` (median size) after 20 and after `steps` AdamW steps of batch 32."""
    info = dataset_info(name)
    d = _load(name)
    fam = FAMILIES[family]
    torch.manual_seed(0)
    model = fam.build(InputShape(info.modality, info.dims, info.num_classes), fam.median())
    opt = torch.optim.AdamW(model.parameters(), lr=lr * fam.lr_scale, foreach=True)
    gen = torch.Generator().manual_seed(0)
    accs = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(d.x_train), (32,), generator=gen)
        loss = loss_of(model(d.x_train[idx]), d.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (20, steps):
            model.eval()
            with torch.no_grad():
                accs.append(float((model(d.x_val[:500]).argmax(1) == d.y_val[:500]).float().mean()))
            model.train()
    return accs[0], accs[1]


@pytest.mark.parametrize("name,family,steps,floor", [
    ("tabular_blobs", "mlp", 300, 0.55),  # chance 1/6
    ("tabular_wide", "mlp", 300, 0.5),  # chance 1/4; not linearly separable (below)
    ("sines", "mlp", 200, 0.6),  # chance 1/8
    ("mnist1d_seq", "conv1d", 150, 0.5),  # chance 1/10
])
def test_learnable_in_a_factory_run_but_not_at_once(name, family, steps, floor):
    torch.set_num_threads(1)
    early, late = _train(name, family, steps)
    assert late > floor and late > early + 0.1, (early, late)
    assert early < 0.9


def test_tabular_wide_defeats_a_linear_model():
    d = _load("tabular_wide")
    acc = LogisticRegression(max_iter=300).fit(d.x_train.numpy(), d.y_train.numpy()).score(d.x_val.numpy(), d.y_val.numpy())
    assert acc < 0.35  # 4 classes: near chance; the MLP above gets > 0.5
