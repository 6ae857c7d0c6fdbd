"""A watched model saves, pickles and deep-copies as if unwatched (the hooks live in capture.hooks, not in
the model), a deep copy is not watched and never touches the original monitor, and remove() leaves no hook
anywhere: the EMA copy of timm's ModelEmaV3 included."""
import copy
import io
import pickle

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

import diagnose
from capture import hooks
from zoo import IMAGE_FAMILIES


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def test_a_watched_model_saves_pickles_and_copies():
    torch.manual_seed(0)
    model = IMAGE_FAMILIES["resnet"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=1)
    _step(model, opt, 0)
    buf = io.BytesIO()
    torch.save(model, buf)  # failed before: "Can't pickle local object 'Capture._block_hook.<locals>.hook'"
    restored = pickle.loads(pickle.dumps(model))
    assert sum(hooks.active(m) for m in restored.modules()) == 0  # an unpickled model is not watched
    ema = ModelEmaV3(model, decay=0.9)  # deep-copies the watched model
    twin = copy.deepcopy(model)  # trainable, unlike the EMA copy
    for copied in (ema.module.train(), twin):
        copied(torch.randn(4, 3, 32, 32)).sum().backward()  # must not feed the original's next frame
    assert all(m is None for m in monitor.capture._maps), "a copy's forward reached the original monitor"
    assert sum(hooks.active(m) for m in twin.modules()) == 0
    assert sum(hooks.active(m) for m in ema.module.modules()) == 0
    _step(model, opt, 1)
    ema.update(model)
    assert len(monitor.readouts) == 2 and monitor.disabled_reason is None
    monitor.remove()
    assert hooks.active() == 0, "no hook anywhere after remove()"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in [*model.modules(), *ema.module.modules()]) == 0
    torch.save(ema.module, io.BytesIO())
