"""The familiarity bank (diagnose/familiarity.py): Unknown as a distance to the training windows' features."""
import pytest
import torch

from diagnose.familiarity import FAMILIARITY_FILE, Familiarity, fit_familiarity, load_familiarity, save_familiarity
from diagnose.tevid import TEViD, TEViDConfig


def _cloud(n=500, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_near_scores_low_far_scores_high_and_a_typical_window_half():
    bank = fit_familiarity(_cloud(), k=5)
    near, far = _cloud(50, seed=1), _cloud(50, seed=2) + 20.0
    s_near, s_far = bank.score(near), bank.score(far)
    assert s_near.median() == pytest.approx(0.5, abs=0.1)  # as far as a training window is from the others
    assert (s_far > 0.85).all() and s_far.min() > s_near.max()
    assert bank.score(torch.full((1, 16), float("nan"))).item() == 1.0  # non-finite features: unfamiliar


def test_a_bank_saves_to_the_same_bytes_every_time_and_older_banks_still_load(tmp_path):
    from safetensors.torch import save_file

    f = fit_familiarity(_cloud(300), k=5, reads="inputs")
    files = []
    for i in range(6):  # safetensors writes a metadata map in hash order: several entries came out shuffled
        (tmp_path / str(i)).mkdir()
        save_familiarity(f, tmp_path / str(i))
        files.append((tmp_path / str(i) / FAMILIARITY_FILE).read_bytes())
    assert all(b == files[0] for b in files)
    old = tmp_path / "old"  # the three-entry metadata of banks saved before
    old.mkdir()
    save_file({"bank": f.bank, "center": f.center.contiguous(), "spread": f.spread.contiguous()}, str(old / FAMILIARITY_FILE),
              metadata={"k": str(f.k), "scale": repr(f.scale), "reads": f.reads})
    g = load_familiarity(old)
    assert torch.equal(g.bank, f.bank) and (g.k, g.scale, g.reads) == (f.k, f.scale, f.reads)


def test_bank_is_a_seeded_subsample_and_round_trips(tmp_path):
    f = fit_familiarity(_cloud(3000), k=10, max_bank=1000, seed=3)
    assert f.bank.shape == (1000, 16) and torch.equal(f.bank, fit_familiarity(_cloud(3000), k=10, max_bank=1000, seed=3).bank)
    save_familiarity(f, tmp_path)
    g = load_familiarity(tmp_path)
    assert torch.equal(g.bank, f.bank) and g.k == f.k and g.scale == f.scale
    assert load_familiarity(tmp_path / "nothing") is None
    (tmp_path / FAMILIARITY_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a familiarity bank"):
        load_familiarity(tmp_path)
    with pytest.raises(ValueError, match="need more than k"):
        fit_familiarity(_cloud(5), k=10)
    with pytest.raises(ValueError, match="N > k"):
        Familiarity(torch.zeros(3, 2), k=5, scale=1.0)


def test_predict_reads_unknown_from_the_bank():
    model = TEViD(TEViDConfig(encoder="tiny", inputs="readouts")).eval()
    r = torch.randn(64, 10, 8)
    with torch.no_grad():
        model.familiarity = fit_familiarity(model.forward_features(None, r), k=5)
        out = model.predict(None, r[:4])
        far = model.predict(None, r[:4] * 1e3)
    torch.testing.assert_close(out["vacuity"], model.familiarity.score(model.forward_features(None, r[:4])))
    torch.testing.assert_close(out["evidential_vacuity"], 5 / out["alpha"].sum(-1))
    assert (far["vacuity"] > out["vacuity"]).all()


def test_an_inputs_bank_standardises_and_sees_a_scalar_training_never_moved(tmp_path):
    """reads="inputs": rows are the window's scalars' mean and last value; each column is centred and scaled by
    the bank (a column constant in training by `floor`), so a window that moves only that column, which a
    features bank barely sees, is far; the center and spread survive the round trip."""
    from capture.relative import RELATIVE_FEATURES
    from diagnose.familiarity import familiarity_rows, window_inputs

    g = torch.Generator().manual_seed(0)
    f = len(RELATIVE_FEATURES)
    train = torch.randn(400, 10, f, generator=g)
    train[..., RELATIVE_FEATURES.index("weight_still")] = 0.0  # every training run moves all its weights
    rows = window_inputs(train)
    assert rows.shape == (400, 2 * f)
    torch.testing.assert_close(rows[:, f:], train[:, -1])
    bank = fit_familiarity(rows, k=5, reads="inputs")
    col = RELATIVE_FEATURES.index("weight_still")
    assert bank.spread[col] == 0.1 and bank.center[col] == 0.0  # the floor: constant in training
    test = torch.randn(50, 10, f, generator=torch.Generator().manual_seed(1))
    test[..., col] = 0.0
    frozen = test.clone()
    frozen[..., col] = 0.48  # asinh(0.5): half the watched tensors still
    s_near, s_far = bank.score_window(None, test), bank.score_window(None, frozen)
    assert s_near.median() == pytest.approx(0.5, abs=0.1) and (s_far > s_near).all()
    save_familiarity(bank, tmp_path)
    again = load_familiarity(tmp_path)
    assert again.reads == "inputs" and torch.equal(again.spread, bank.spread)
    torch.testing.assert_close(again.score_window(None, frozen), s_far)
    both = familiarity_rows("both", torch.ones(50, 3), test)
    assert both.shape == (50, 3 + 2 * f)
    with pytest.raises(ValueError, match="reads must be one of"):
        Familiarity(bank.bank, 5, 1.0, reads="weights")
    with pytest.raises(ValueError, match="scalars \\(B, T, F\\)"):
        window_inputs(torch.zeros(3, 4))
