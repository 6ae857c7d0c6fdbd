"""capture.weights: how fast the watched layers' weights move, from the parameters alone."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import capture
from capture.weights import WeightStep


def test_the_pace_is_the_sampled_weights_relative_movement_per_step():
    torch.manual_seed(0)
    lin = nn.Linear(300, 200)
    pace = WeightStep([lin], per_tensor=1000)
    assert [stride for _, stride in pace.params] == [60, 1] and len(pace.sample()) == 1000 + 200  # every 60th weight, every bias
    assert math.isnan(pace.frame(0))  # nothing to compare with yet
    before = pace.sample().clone()
    with torch.no_grad():
        lin.weight.add_(0.01 * torch.randn_like(lin.weight))
    after = pace.sample()
    want = float(torch.linalg.vector_norm(after - before) / torch.linalg.vector_norm(after) / 4)
    assert pace.frame(4) == want > 0  # moved over 4 steps: per step
    assert pace.frame(8) == 0.0  # no movement since
    frozen = nn.Linear(3, 3).requires_grad_(False)
    assert WeightStep([frozen]).sample() is None and math.isnan(WeightStep([frozen]).frame(3))


def test_a_raised_learning_rate_moves_the_weights_that_much_faster():
    """SGD's step is lr x gradient: 30x the learning rate, about 30x the pace (the gradients of
    neighbouring steps barely differ on a fixed batch); the capture hands it out as a readout."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    with capture.attach(model, cadence=4, frame_size=8, optimizer=opt) as cap:
        for step in range(16):
            if step == 8:
                opt.param_groups[0]["lr"] = 3e-3
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            cap.step(loss)
            opt.step()
            opt.zero_grad()
    paces = [f.readouts["weight_step"] for f in cap.frames]  # frames at steps 0, 4, 8, 12
    assert math.isnan(paces[0]) and not cap.faults
    assert 20 < paces[3] / paces[2] < 40


def test_weight_still_is_the_share_of_tensors_that_stopped_while_others_move():
    """A freeze of the input-side half (factory.perturbations.FrozenLayers: their gradients dropped before the
    step) under AdamW with weight decay: before it every watched tensor moves (0), after it the frozen ones
    read as still; a frame where nothing moved at all reads 0 (the pace says that)."""
    from factory.perturbations import FrozenLayers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    freeze = FrozenLayers(name="frozen_layers", onset=8)
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    with capture.attach(model, cadence=4, frame_size=8, optimizer=opt) as cap:
        for step in range(16):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            cap.step(loss)
            freeze.before_step(step, model, opt)
            opt.step()
            opt.zero_grad()
    still = [f.readouts["weight_still"] for f in cap.frames]  # frames at steps 0, 4, 8, 12
    assert math.isnan(still[0]) and still[1] == 0.0 and not cap.faults
    watched = cap._weights.params  # the sampled tensors; the frozen ones are the first 3 of the model's 6
    frozen = {id(p) for p in freeze.frozen(model)}
    want = sum(id(p) in frozen for p, _ in watched) / len(watched)
    assert 0 < want < 1 and still[3] == want  # steps 9-12: every step after the onset
    pace = WeightStep([model])
    pace.frame(0)
    assert pace.frame(1) == 0.0 and pace.still == 0.0  # nothing moved: not "all still"
