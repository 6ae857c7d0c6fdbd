"""factory.datasets: every built-in dataset keeps the TaskData contract, is deterministic and
subsamples; procedural parameters do what they say; real on-disk formats load from small fake
files written here; errors name what is missing."""
import functools
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from factory.datasets import (
    BUILTIN,
    DATASETS,
    TEXT_BLOCK,
    VOCAB,
    TaskData,
    decode_chars,
    encode_chars,
    load_dataset,
    mnist1d_signals,
    render_signals,
    subsample_index,
)

IMAGE_BUILTIN = [n for n in BUILTIN if n != "pydoc_chars"]
SMALL = {"shapes": dict(n_train=240, n_val=60), "textures": dict(n_train=240, n_val=60),
         "mnist1d": dict(n_train=200, n_val=50), "digits": {}, "pydoc_chars": {},
         # the other modalities of the randomised corpus (tests/test_datasets_modalities.py)
         "tabular_blobs": dict(n_train=300, n_val=100), "tabular_wide": dict(n_train=300, n_val=100),
         "mnist1d_seq": dict(n_train=300, n_val=100), "sines": dict(n_train=300, n_val=100),
         "pysrc_chars": dict(max_chars=100_000)}
FIXED_TEXTS = {"pydoc_chars", "pysrc_chars"}  # fixed corpora: the seed has nothing to change


@functools.lru_cache(maxsize=None)
def _cached(name: str, **kw) -> TaskData:
    """Default loads are shared by the tests that only read them."""
    return load_dataset(name, **kw)


def _unstandardise(d: TaskData, x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(d.meta["std"]).view(1, 3, 1, 1) + torch.tensor(d.meta["mean"]).view(1, 3, 1, 1)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.flatten(1).numpy()}


def test_registry_holds_every_dataset():
    assert set(DATASETS) == {"digits", "mnist1d", "shapes", "textures", "pydoc_chars", "cifar10", "cifar100",
                             "svhn", "tiny_imagenet", "wikitext2",
                             "tabular_blobs", "tabular_wide", "mnist1d_seq", "sines", "pysrc_chars",
                             "mnist1d_aligned", "mnist1d_aligned_seq"}
    assert set(BUILTIN) <= set(DATASETS)


# ------------------------------------------------------------------ built-in contract
@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_contract(name):
    d = _cached(name)
    assert d.name == name
    if d.modality == "text":
        assert d.y_train is None and d.y_val is None
        for x in (d.x_train, d.x_val):
            assert x.dtype == torch.int64 and x.ndim == 1 and len(x) > 1000
            assert 0 <= int(x.min()) and int(x.max()) < d.num_classes
        assert d.num_classes == len(d.meta["vocab"]) <= 100
        return
    assert d.modality == "image"
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val)):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all()
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert set(y.tolist()) == set(range(d.num_classes))  # every class present, none out of range
    std, mean = torch.std_mean(d.x_train, dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-3)


def test_builtin_default_sizes():
    sizes = {n: (len(_cached(n).x_train), len(_cached(n).x_val)) for n in IMAGE_BUILTIN}
    assert sizes["mnist1d"] == (4000, 1000) and sizes["shapes"] == (3000, 600) and sizes["textures"] == (3000, 600)
    assert sizes["digits"] == (1437, 360)  # 1,797 images, 80/20
    assert _cached("shapes").num_classes == 6 and _cached("mnist1d").num_classes == 10


@pytest.mark.parametrize("name", IMAGE_BUILTIN)
def test_train_and_val_are_disjoint(name):
    d = _cached(name)
    assert not _rows(d.x_train) & _rows(d.x_val)
    if name == "digits":
        assert not set(d.meta["train_index"]) & set(d.meta["val_index"])


def test_pydoc_chars_is_a_contiguous_90_10_split():
    from pydoc_data.topics import topics

    d = _cached("pydoc_chars")
    full = encode_chars("\n\n".join(topics[k] for k in sorted(topics)))
    assert torch.equal(torch.cat([d.x_train, d.x_val]), full)
    assert abs(len(d.x_train) / len(full) - 0.9) < 1e-3
    assert d.meta["vocab"] == VOCAB and "def" in decode_chars(d.x_train[:20000])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_per_seed(name):
    a, b = load_dataset(name, seed=3, **SMALL[name]), load_dataset(name, seed=3, **SMALL[name])
    c = load_dataset(name, seed=4, **SMALL[name])
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)
    if name in FIXED_TEXTS:
        assert torch.equal(a.x_train, c.x_train)
    else:
        assert torch.equal(a.y_train, b.y_train)
        assert not torch.equal(a.x_train, c.x_train)


@pytest.mark.parametrize("name", BUILTIN)
def test_max_train_and_max_val_subsample(name):
    full = _cached(name) if name in ("digits", "pydoc_chars") else load_dataset(name, **SMALL[name])
    d = load_dataset(name, max_train=40, max_val=20, **SMALL[name])
    if d.modality == "text":
        assert torch.equal(d.x_train, full.x_train[: 40 * TEXT_BLOCK])
        assert torch.equal(d.x_val, full.x_val[: 20 * TEXT_BLOCK])
        return
    assert len(d.x_train) == 40 and len(d.x_val) == 20
    counts = torch.bincount(d.y_train, minlength=d.num_classes)
    assert counts.max() - counts.min() <= 1  # class-balanced
    nearest = torch.cdist(_unstandardise(d, d.x_train).flatten(1), _unstandardise(full, full.x_train).flatten(1),
                          compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert nearest.max() < 1e-3  # a subset of the full split's images
    again = load_dataset(name, max_train=40, max_val=20, **SMALL[name])
    assert torch.equal(d.x_train, again.x_train)
    std, mean = torch.std_mean(d.x_train, dim=(0, 2, 3))  # re-standardised on the subset
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4) and torch.allclose(std, torch.ones(3), atol=1e-3)


def test_subsample_index_is_balanced_and_sorted():
    labels = np.repeat(np.arange(5), [50, 10, 10, 10, 3])
    idx = subsample_index(len(labels), 15, 0, labels)
    assert np.all(np.diff(idx) > 0) and np.bincount(labels[idx], minlength=5).tolist() == [3, 3, 3, 3, 3]
    assert subsample_index(10, None, 0).tolist() == list(range(10))


@pytest.mark.parametrize("name", IMAGE_BUILTIN)
@pytest.mark.parametrize("size", [16, 48])
def test_image_size(name, size):
    d = load_dataset(name, image_size=size, **SMALL[name])
    assert d.x_train.shape[1:] == (3, size, size) and d.x_val.shape[1:] == (3, size, size)


# ------------------------------------------------------------------ procedural parameters
@pytest.mark.parametrize("name", ["shapes", "textures"])
def test_num_classes(name):
    d = load_dataset(name, num_classes=10, n_train=200, n_val=50)
    assert d.num_classes == 10 and set(d.y_train.tolist()) == set(range(10)) == set(d.y_val.tolist())
    assert len(d.meta["classes"]) == 10
    assert load_dataset(name, num_classes=2, n_train=20, n_val=10).y_train.max() == 1
    with pytest.raises(ValueError, match="num_classes must be in"):
        load_dataset(name, num_classes=11)


@pytest.mark.parametrize("name", ["shapes", "textures"])
def test_noise_is_additive_gaussian_with_the_given_std(name):
    """Same seed: the same clean images at any noise level, so raw(noise) - raw(0) is the noise."""
    clean = load_dataset(name, noise=0.0, n_train=100, n_val=20)
    noisy = load_dataset(name, noise=0.5, n_train=100, n_val=20)
    diff = _unstandardise(noisy, noisy.x_train) - _unstandardise(clean, clean.x_train)
    assert abs(float(diff.std()) - 0.5) < 0.01 and abs(float(diff.mean())) < 0.01
    assert min(noisy.meta["std"]) > max(clean.meta["std"])  # raw pixel variance goes up


def _spectrum(x: torch.Tensor) -> np.ndarray:
    """Amplitude spectrum summed over channels: invariant to where the shape sits, to the phase of
    a texture and to colour polarity, which is all these classes randomise."""
    return torch.log1p(torch.fft.rfft2(x).abs()).sum(1).flatten(1).numpy()


def _linear_accuracy(x_train, y_train, x_val, y_val, max_iter: int = 200) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(C=0.1, max_iter=max_iter).fit(x_train, y_train)
    return clf.score(x_val, y_val)


@pytest.mark.parametrize("name", ["shapes", "textures"])
def test_procedural_tasks_are_learnable(name):
    """A linear model on 16x16 images beats chance (1/6) clearly. On raw pixels it cannot, by
    construction (random position / phase / colour), so it reads their amplitude spectrum."""
    d = load_dataset(name, image_size=16, n_train=900, n_val=300)
    acc = _linear_accuracy(_spectrum(d.x_train), d.y_train.numpy(), _spectrum(d.x_val), d.y_val.numpy())
    assert acc > 0.4


def test_mnist1d_is_as_hard_for_a_linear_model_as_in_the_paper():
    """Greydanus (2020) reports ~32% for logistic regression on the 1-D signals: a generator that
    lost its translation / noise would be far easier, one that lost the digits would be at 10%."""
    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(2500) % 10)
    x = mnist1d_signals(y, 40, rng)
    x = (x - x.mean()) / x.std()
    acc = _linear_accuracy(x[:2000], y[:2000], x[2000:], y[2000:], max_iter=300)
    assert 0.2 < acc < 0.45
    d = load_dataset("mnist1d", image_size=16, n_train=1000, n_val=300)  # the rendered images too
    acc = _linear_accuracy(d.x_train.flatten(1).numpy(), d.y_train.numpy(), d.x_val.flatten(1).numpy(), d.y_val.numpy())
    assert acc > 0.25


def test_mnist1d_aligned_is_the_same_digits_made_easier():
    """The aligned variant (small shifts, less noise: the drawn corpus's test datasets) keeps the digits
    and is far easier for a linear model than the reference settings (0.2-0.45 above)."""
    from factory.datasets import MNIST1D_ALIGNED_ARGS

    rng = np.random.default_rng(0)
    y = rng.permutation(np.arange(2500) % 10)
    x = mnist1d_signals(y, 40, rng, MNIST1D_ALIGNED_ARGS)
    x = (x - x.mean()) / x.std()
    assert _linear_accuracy(x[:2000], y[:2000], x[2000:], y[2000:], max_iter=300) > 0.6
    img, seq = load_dataset("mnist1d_aligned", n_train=200, n_val=50), load_dataset("mnist1d_aligned_seq", n_train=200, n_val=50)
    assert img.modality == "image" and seq.modality == "sequence" and img.y_train.tolist() == seq.y_train.tolist()


def test_render_signals_draws_the_curve():
    t = np.linspace(0, 2 * np.pi, 40)
    signals = np.stack([2.5 * np.sin(t), np.full(40, -1.0)])
    img = render_signals(signals, 32)
    assert img.shape == (2, 32, 32) and img.min() >= 0 and img.max() <= 1
    assert (img.max(axis=1) == 1).all()  # no gaps: every column is lit
    rows = np.arange(32)[None, :, None]
    centroid = (img * rows).sum(1) / img.sum(1)
    assert np.allclose(centroid[1], (1 + 1 / 3.5) / 2 * 32 - 0.5, atol=0.01)  # a flat line at -1
    assert centroid[0, 8] < 16 < centroid[0, 24]  # sine: up first (small rows), then down


# ------------------------------------------------------------------ real formats, fake files
def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar(folder, train_files, test_file, label_key, n_classes, rng):
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, f in enumerate(train_files + [test_file]):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = [(i * 4 + j) % n_classes for j in range(4)]
        _pickle(folder / f, {b"data": data, label_key: labels, b"coarse_labels": [0] * 4, b"filenames": [b"x"] * 4})
        written[f] = (data, labels)
    return written


def test_cifar10_pickle_batches(tmp_path):
    files = [f"data_batch_{i}" for i in range(1, 6)]
    written = _fake_cifar(tmp_path / "cifar-10-batches-py", files, "test_batch", b"labels", 10, np.random.default_rng(0))
    for root in (tmp_path / "cifar-10-batches-py", tmp_path):  # the folder itself or its parent
        d = load_dataset("cifar10", root=str(root))
        assert d.num_classes == 10 and d.x_train.shape == (20, 3, 32, 32) and d.x_val.shape == (4, 3, 32, 32)
        assert d.y_train.tolist() == sum((written[f][1] for f in files), [])
        assert d.y_val.tolist() == written["test_batch"][1]
        # rows are 1024 red, 1024 green, 1024 blue values, row-major
        first = torch.from_numpy(written["data_batch_1"][0][0].reshape(3, 32, 32) / 255.0).float()
        assert torch.allclose(_unstandardise(d, d.x_train[:1])[0], first, atol=1e-5)
    assert load_dataset("cifar10", root=str(tmp_path), max_train=10, image_size=16).x_train.shape == (10, 3, 16, 16)


def test_cifar100_fine_labels(tmp_path):
    written = _fake_cifar(tmp_path, ["train"], "test", b"fine_labels", 100, np.random.default_rng(1))
    d = load_dataset("cifar100", root=str(tmp_path))
    assert d.num_classes == 100 and d.x_train.shape == (4, 3, 32, 32)
    assert d.y_train.tolist() == written["train"][1] and d.y_val.tolist() == written["test"][1]


def test_svhn_mat_files(tmp_path):
    rng = np.random.default_rng(2)
    split = {}
    for f, labels in (("train_32x32.mat", [10, 1, 2, 10, 9]), ("test_32x32.mat", [3, 10])):
        X = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        savemat(tmp_path / f, {"X": X, "y": np.asarray(labels, dtype=np.uint8)[:, None]})
        split[f] = X
    d = load_dataset("svhn", root=str(tmp_path))
    assert d.x_train.shape == (5, 3, 32, 32) and d.x_val.shape == (2, 3, 32, 32)
    assert d.y_train.tolist() == [0, 1, 2, 0, 9] and d.y_val.tolist() == [3, 0]  # 10 means digit 0
    img = torch.from_numpy(split["train_32x32.mat"][:, :, :, 1].transpose(2, 0, 1) / 255.0).float()
    assert torch.allclose(_unstandardise(d, d.x_train[1:2])[0], img, atol=1e-5)


def _fake_tiny_imagenet(root):
    """3 classes (given unsorted in wnids.txt), 2 train + 1 val JPEG each, one solid colour per
    class; one grayscale image, as the real set has some."""
    wnids = ["n03", "n01", "n02"]
    colours = {"n01": (250, 0, 0), "n02": (0, 250, 0), "n03": (0, 0, 250)}
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colours[w]).save(root / "train" / w / "images" / f"{w}_{i}.JPEG")
        Image.new("RGB", (8, 8), colours[w]).save(root / "val" / "images" / f"val_{w}.JPEG")
        lines.append(f"val_{w}.JPEG\t{w}\t0\t0\t8\t8")
    Image.new("L", (8, 8), 128).save(root / "train" / "n01" / "images" / "n01_2.JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def test_tiny_imagenet_folder_tree(tmp_path):
    _fake_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    d = load_dataset("tiny_imagenet", root=str(tmp_path), image_size=16)
    assert d.num_classes == 3 and d.meta["wnids"] == ["n01", "n02", "n03"]  # sorted, as ImageFolder
    assert d.x_train.shape == (7, 3, 16, 16) and d.x_val.shape == (3, 3, 16, 16)
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 2, 2] and d.y_val.tolist() == [2, 0, 1]
    raw = _unstandardise(d, d.x_val).mean(dim=(2, 3))  # each val image has its class's colour
    assert torch.allclose(raw, torch.tensor([[0, 0, 0.98], [0.98, 0, 0], [0, 0.98, 0]]), atol=0.05)
    grey = _unstandardise(d, d.x_train[2:3]).mean(dim=(2, 3))[0]
    assert torch.allclose(grey, torch.full((3,), 128 / 255), atol=0.02)
    two = load_dataset("tiny_imagenet", root=str(tmp_path / "tiny-imagenet-200"), num_classes=2, max_train=2)
    assert two.num_classes == 2 and two.y_train.tolist() == [0, 1] and two.y_val.tolist() == [0, 1]


def test_wikitext2_raw_files(tmp_path):
    train = " = Valkyria = \n\n Senjō no Valkyria\n" * 20
    (tmp_path / "wiki.train.raw").write_text(train, encoding="utf-8")
    (tmp_path / "wiki.valid.raw").write_text(" = Homarus = \n", encoding="utf-8")
    d = load_dataset("wikitext2", root=str(tmp_path))
    assert d.modality == "text" and d.num_classes == len(VOCAB) and d.y_train is None
    assert decode_chars(d.x_val) == " = Homarus = \n"
    assert decode_chars(d.x_train) == train.replace("ō", "\ufffd")  # out of vocabulary
    assert len(load_dataset("wikitext2", root=str(tmp_path), max_train=1).x_train) == min(TEXT_BLOCK, len(d.x_train))


def test_encode_chars_maps_printable_ascii_and_nothing_else():
    assert len(VOCAB) <= 100 and len(set(VOCAB)) == len(VOCAB)
    text = "Hello,\tworld!\n~ é\u2019\r"
    tokens = encode_chars(text)
    assert tokens.dtype == torch.int64
    assert decode_chars(tokens) == "Hello,\tworld!\n~ \ufffd\ufffd\ufffd"


# ------------------------------------------------------------------ errors
def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar10.*digits.*shapes"):
        load_dataset("imagenet")


def test_unknown_param_is_an_error():
    with pytest.raises(ValueError, match=r"unknown params \['colour'\].*num_classes"):
        load_dataset("shapes", colour="red")


@pytest.mark.parametrize("name,files", [
    ("cifar10", ["data_batch_1", "data_batch_5", "test_batch"]),
    ("cifar100", ["train", "test"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ("tiny_imagenet", ["wnids.txt", "val/val_annotations.txt"]),
    ("wikitext2", ["wiki.train.raw", "wiki.valid.raw"]),
])
def test_missing_or_wrong_root_names_the_expected_files(name, files, tmp_path):
    with pytest.raises(FileNotFoundError, match="pass root=") as missing:
        load_dataset(name)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))) as wrong:
        load_dataset(name, root=str(tmp_path))
    for f in files:
        assert f in str(missing.value) and f in str(wrong.value)
