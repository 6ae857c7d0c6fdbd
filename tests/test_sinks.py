"""The sinks (diagnose/sinks.py): a real training job logs into TensorBoard and an offline wandb run,
read back with each tool's own reader (TensorBoard's EventAccumulator, `wandb leet inspect --json`)."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from zoo import IMAGE_FAMILIES

import diagnose
from capture import CHANNELS
from diagnose.sinks import MonitorCallback, SinkConfig, TensorBoardSink, WandbSink, frame_images
from diagnose.symptoms import Alert

pytestmark = [
    pytest.mark.usefixtures("no_default_model", "one_thread"),  # rule symptoms only, no shipped TEViD
    # the capture's warning once the weights are NaN (the frame after the NaN step): not what is tested here
    pytest.mark.filterwarnings("ignore:the loss on the head's output is not a softmax loss:RuntimeWarning"),
]
STEPS, CADENCE, NAN_AT = 8, 2, 5
INJECTED = Alert("instability", 3, "tevid", 0.875, "TEViD: instability (injected by the test)")


def train_with(callbacks) -> diagnose.Monitor:
    """A tiny timm ResNet, 8 SGD steps on random 32x32 images, a NaN input at step 5 (-> `nan_inf`), one
    TEViD-style alert handed to the callbacks by hand; the monitor is removed at the end."""
    model = IMAGE_FAMILIES["resnet"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    monitor = diagnose.watch(model, opt, checkpoint=False, cadence=CADENCE, callbacks=callbacks)
    for step in range(STEPS):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        if step == NAN_AT:
            x = x * float("nan")
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if step == INJECTED.step:
            for cb in callbacks:
                getattr(cb, "on_alert", cb)(INJECTED)
    monitor.remove()
    return monitor


def expected_scalars(monitor) -> dict[str, list[tuple[int, float]]]:
    """readout name -> [(step, value)] of its finite values, from the monitor's own record."""
    out: dict[str, list] = {}
    for r in monitor.readouts:
        for k, v in r.items():
            if k != "step" and math.isfinite(v):
                out.setdefault(k, []).append((r["step"], v))
    return out


def test_tensorboard_sink_real_training(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    monitor = train_with([sink])
    assert monitor.disabled_reason is None and sink.faults == []
    assert [r["step"] for r in monitor.readouts] == [0, 2, 4, 6]
    assert [(a.name, a.step) for a in monitor.alerts] == [("nan_inf", NAN_AT)]

    # remove() closed the sink: everything is on disk, nothing flushed by hand
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    want = expected_scalars(monitor)
    assert "loss" in want and want["loss"][-1][0] == 4  # from step 5 on the weights are NaN: no loss readout
    for name, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(f"tevid/readouts/{name}")]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name
    nan_readouts = {k for r in monitor.readouts for k, v in r.items() if k != "step" and math.isnan(v)}
    assert nan_readouts and all(f"tevid/readouts/{k}" not in tags["scalars"] for k in nan_readouts - set(want))

    # the six channels, one grayscale image per frame, pixel for pixel what frame_images makes of the frame
    frames = {f.step: f for f in monitor.frames}
    assert sorted(frames) == [0, 2, 4, 6]
    for c, channel in enumerate(CHANNELS):
        events = acc.Images(f"tevid/frames/{channel}")
        assert [e.step for e in events] == [0, 2, 4, 6]
        for e in events:
            img = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("L"))
            assert img.shape == (32, 32)  # not upscaled: TensorBoard draws image pixels sharp
            np.testing.assert_array_equal(img, frame_images(frames[e.step].frame)[c])
    assert len({acc.Images("tevid/frames/act_early")[i].encoded_image_string for i in range(4)}) > 1  # frames differ

    # alerts: a scalar (probability, 1.0 for a rule) and a line of text, at the alert's own step
    assert [(e.step, e.value) for e in acc.Scalars("tevid/alerts/nan_inf")] == [(NAN_AT, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("tevid/alerts/instability")] == [(3, 0.875)]
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("tevid/alerts/text_summary")}
    assert sorted(texts) == [3, NAN_AT]
    assert texts[NAN_AT].startswith("**nan_inf** (rule) at step 5: ") and monitor.alerts[0].message in texts[NAN_AT]
    assert texts[3] == "**instability** (tevid, p = 0.875) at step 3: TEViD: instability (injected by the test)"


def test_sink_image_options(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    frame = torch.tensor([[[-8.0, -4.0], [0.0, 2.0]]] * 6, dtype=torch.bfloat16)  # (6, 2, 2)
    imgs = frame_images(frame, image_range=4.0, image_size=5)  # k = ceil(5 / 2) = 3
    assert imgs.shape == (6, 6, 6) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs[0, ::3, ::3], [[0, 0], [128, 191]])  # clipped, 0 -> mid-gray
    sink = TensorBoardSink(tmp_path, SinkConfig(prefix="", image_every=2, image_size=100))
    monitor = train_with([sink])
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.width) for e in acc.Images("frames/grad_late")] == [(0, 128), (4, 128)]  # every 2nd frame, 4x
    assert [e.step for e in acc.Scalars("readouts/lr")] == [r["step"] for r in monitor.readouts]  # readouts: every frame


def test_sink_faults_never_reach_the_loop(tmp_path, caplog):
    (tmp_path / "file").write_text("a regular file")
    sink = TensorBoardSink(tmp_path / "file" / "tb")  # can never be created
    with caplog.at_level(logging.WARNING, logger="tevid"):
        monitor = train_with([sink])
    assert monitor.step_count == STEPS and monitor.disabled_reason is None
    assert [a.name for a in monitor.alerts] == ["nan_inf"]  # the monitor's own work is untouched
    assert len(sink.faults) == 4 + 2  # every frame and every alert failed ...
    warned = [r.getMessage() for r in caplog.records if "could not log" in r.getMessage()]
    assert len(warned) == 2 and {w.split("(")[1].split(";")[0] for w in warned} == {"on_frame", "on_alert"}  # ... logged once per place


def test_remove_closes_callbacks_once(caplog):
    closed = []

    class Counting(MonitorCallback):
        def close(self):
            closed.append("counting")

    class Broken(MonitorCallback):
        def close(self):
            raise OSError("disk gone")

    seen = []
    with caplog.at_level(logging.WARNING, logger="tevid"):
        monitor = train_with([Broken(), Counting(), seen.append])
        monitor.remove()  # idempotent: no second close
    assert closed == ["counting"] and [a.name for a in seen] == ["instability", "nan_inf"]
    assert any("close() at remove() failed: OSError: disk gone" in r.getMessage() for r in caplog.records)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="log_dir"):
        TensorBoardSink(None)
    with pytest.raises(TypeError, match="config"):
        TensorBoardSink("runs", config={"prefix": ""})
    with pytest.raises(ValueError, match="image_every"):
        SinkConfig(image_every=0)
    with pytest.raises(ValueError, match="prefix"):
        WandbSink(config=SinkConfig(prefix=""))  # checked before any run starts


def test_wandb_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does when it is not installed
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbSink()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb writing to tmp_path only: offline, quiet, no network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of an offline run, read from its .wandb transaction log by wandb's own reader."""
    (log,) = run_dir.glob("run-*.wandb")
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(log)],
                         capture_output=True, text=True, check=True, timeout=60)
    records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return [r["history"]["item"] for r in records if r.get("type") == "history"]


def test_wandb_sink_offline(wandb_offline):
    import wandb

    sink = WandbSink(project="tevid-sinks-test")
    run_dir = Path(sink.run.dir).parent
    monitor = train_with([sink])
    assert sink.faults == [] and sink.run is None  # the run it started is finished at remove()
    rows = wandb_history(run_dir)
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["tevid/step"], {}).update(row)
    assert sorted(by_step) == [0, 2, 3, 4, NAN_AT, 6]  # frames at 0, 2, 4, 6; alerts at 3 and 5
    for name, points in expected_scalars(monitor).items():
        got = [(s, by_step[s][f"tevid/readouts/{name}"]) for s in sorted(by_step) if f"tevid/readouts/{name}" in by_step[s]]
        assert [s for s, _ in got] == [s for s, _ in points], name
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), name
    for s in (0, 2, 4, 6):
        for channel in CHANNELS:
            assert by_step[s][f"tevid/frames/{channel}._type"] == "image-file"
            assert by_step[s][f"tevid/frames/{channel}.width"] == 128
    assert by_step[3]["tevid/alerts/instability"] == 0.875 and by_step[NAN_AT]["tevid/alerts/nan_inf"] == 1.0
    table = json.loads((run_dir / "files" / by_step[NAN_AT]["tevid/alerts.path"]).read_text())
    assert table["columns"] == ["step", "name", "source", "probability", "message"]
    assert [r[:4] for r in table["data"]] == [[3, "instability", "tevid", 0.875], [NAN_AT, "nan_inf", "rule", None]]
    assert wandb.run is None


def test_wandb_sink_leaves_the_users_run_open(wandb_offline):
    import wandb

    run = wandb.init(project="tevid-sinks-test")
    try:
        sink = WandbSink()  # no arguments: logs into the active run
        assert sink.run is run
        sink.on_frame(diagnose.monitor.Frame(7, torch.zeros(6, 4, 4, dtype=torch.bfloat16), {"loss": 1.5, "gwa": math.nan}))
        sink.close()
        assert wandb.run is run and sink.faults == []
        run.log({"user/metric": 1.0})  # still the user's to log into
    finally:
        run.finish()
    rows = wandb_history(Path(run.dir).parent)
    assert rows[0]["tevid/step"] == 7 and rows[0]["tevid/readouts/loss"] == 1.5 and "tevid/readouts/gwa" not in rows[0]
    assert rows[1]["user/metric"] == 1.0
