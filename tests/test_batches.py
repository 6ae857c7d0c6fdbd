"""capture.batches and the label-reading readouts: a loader that repeats its batches, labels the model contradicts."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import capture
from capture.batches import BatchRecurrence
from capture.readouts import confident_miss, gradient_labels


def _train(batch, steps=48, cadence=4, smoothing=0.0, classes=5):
    """A small MLP trained on `batch(step) -> (x, y)`; the capture's frames."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with capture.attach(model, cadence=cadence, frame_size=8) as cap:
        for step in range(steps):
            x, y = batch(step)
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            loss.backward()
            cap.step(loss)
            opt.step()
            opt.zero_grad()
    assert not cap.faults
    return cap.frames


def test_a_cycle_of_batches_reads_as_repeats_from_its_first_return_and_fresh_batches_never_do():
    """From step 16 the loader cycles 6 batches (factory.perturbations.RepeatBatches); at cadence 4 a batch
    comes back 6 / gcd(4, 6) = 3 frames later. Fresh random batches, the same size, never read as repeats, and
    attaching the capture leaves the user's random state where it was."""
    gen = torch.Generator().manual_seed(0)
    cycle = []

    def batch(step):
        x, y = torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        if step < 16:
            return x, y
        if len(cycle) < 6:
            cycle.append((x, y))
        return cycle[(step - 16) % 6]

    repeats = [f.readouts["batch_repeat"] for f in _train(batch)]  # frames at steps 0, 4, ..., 44
    assert repeats == [0.0] * 7 + [1.0] * 5  # steps 28-44: the batches of steps 16-32 again
    torch.manual_seed(3)
    before = torch.rand(3)
    torch.manual_seed(3)
    fresh = _train(lambda step: (torch.randn(16, 12, generator=gen), torch.randint(0, 5, (16,), generator=gen)))
    assert [f.readouts["batch_repeat"] for f in fresh] == [0.0] * 12


def test_a_batch_matches_only_itself_and_a_memory_forgets():
    rec = BatchRecurrence(memory=2)
    a, b, c = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 3)
    assert math.isnan(rec.readout())  # nothing observed
    seq = []
    for x in (a, b, a, c, b, a):
        rec.observe("input", x)
        rec.observe("input", torch.randn(8, 3))  # a second forward of the step: the first stays
        seq.append(rec.readout())
    assert seq == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # b (at 4) and a (at 5) are 3 frames back: out of a 2-frame memory
    rec.observe("input", a.clone())
    rec.observe("labels", torch.tensor([1, 2]))  # different parts than the frames remembered: no match
    assert rec.readout() == 0.0
    with pytest.raises(ValueError, match="memory"):
        BatchRecurrence(memory=0)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_labels_come_back_from_the_softmax_gradient_with_or_without_smoothing(smoothing):
    """`t = p - s G` with the loss's scale s read from the batch: its argmax is the label, also for a
    confidently right row under label smoothing (whose gradient pushes the label down), for a summed loss and
    one scaled for gradient accumulation; rows of an LM's (B, T, V) logits are flattened."""
    torch.manual_seed(0)
    logits = torch.randn(64, 7) * 4
    y = torch.randint(0, 7, (64,))
    logits[:8, :] = 0
    logits[torch.arange(8), y[:8]] = 30.0  # confidently right
    for reduction, factor in (("mean", 1.0), ("sum", 1.0), ("mean", 0.25)):
        z = logits.clone().requires_grad_(True)
        (factor * F.cross_entropy(z, y, label_smoothing=smoothing, reduction=reduction)).backward()
        assert torch.equal(gradient_labels(z.grad, logits), y)
    lm = torch.randn(4, 9, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (4, 9))
    F.cross_entropy(lm.flatten(0, 1), tokens.flatten()).backward()
    assert torch.equal(gradient_labels(lm.grad, lm.detach()), tokens.flatten())


def test_confident_miss_counts_the_labels_the_model_contradicts():
    """Rows 0-9 confidently right, 10-14 confidently wrong (top p ~ 1 on another class), 15-19 wrong but unsure
    (top p < 0.5), 20-23 ignored (no gradient): 5 misses of the 20 counted rows."""
    logits = torch.zeros(24, 4)
    y = torch.zeros(24, dtype=torch.long)
    logits[:10, 0] = 10.0
    logits[10:15, 2] = 10.0
    logits[15:20, 1] = 0.5
    target = y.clone()
    target[20:] = -100
    z = logits.clone().requires_grad_(True)
    F.cross_entropy(z, target).backward()
    assert float(confident_miss(z.grad, logits)) == pytest.approx(5 / 20)
    assert math.isnan(float(confident_miss(torch.zeros(3, 4), logits[:3])))


def test_flipped_labels_raise_the_misses_and_keep_them_up():
    """25% of the labels redrawn at random from step 160 (factory.perturbations.LabelNoise) on a task the MLP
    fits: the capture's confident_miss sits well above its level before, for as long as the noise lasts;
    smoothing alone does not raise it."""
    torch.manual_seed(0)
    w = torch.randn(12, 5)
    gen = torch.Generator().manual_seed(0)

    def batch(step, noise=True):
        x = torch.randn(64, 12, generator=gen)
        y = (x @ w).argmax(1)
        if noise and step >= 160:
            flip = torch.rand(64, generator=gen) < 0.25
            y = torch.where(flip, torch.randint(0, 5, (64,), generator=gen), y)
        return x, y

    misses = torch.tensor([f.readouts["confident_miss"] for f in _train(batch, steps=320)])  # 80 frames
    before, early, late = misses[25:40].mean(), misses[45:60].mean(), misses[65:].mean()
    assert early > before + 0.06 and late > before + 0.06  # the flipped share (25%) times the accuracy, less what it unlearns
    smooth = torch.tensor([f.readouts["confident_miss"] for f in _train(lambda s: batch(s, False), steps=320, smoothing=0.1)])
    assert smooth[45:].mean() < before + 0.03
