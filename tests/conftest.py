import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # before torch is imported
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smoke_corpus(tmp_path_factory) -> Path:
    """The `smoke` factory corpus (7 tiny runs, every split), generated once per test session.
    Tests must treat it as read-only (copy it to tmp_path before changing anything)."""
    from factory.generate import main as generate_main

    out = tmp_path_factory.mktemp("corpus") / "smoke"
    assert generate_main(["--config", str(ROOT / "configs" / "factory" / "smoke.yaml"), "--out", str(out)]) == 0
    return out


@pytest.fixture
def one_thread():
    """One torch thread for the test (the CPU may be shared with other jobs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PrivilegedWatch:
    """Records every file open or directory listing under a `privileged/` path while active
    (a Python audit hook: it cannot be removed, so it stays inert outside `with`)."""

    def __init__(self):
        self.touched: list[tuple[str, str]] = []
        self.active = False
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event in ("open", "os.listdir", "os.scandir") and args and "privileged" in str(args[0]):
            self.touched.append((event, str(args[0])))

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture
def privileged_watch() -> PrivilegedWatch:
    return PrivilegedWatch()


def copy_without_privileged(corpus: Path, dest: Path, lock: bool = False) -> Path:
    """A copy of `corpus` whose every `privileged/` group is destroyed: emptied, its zarr.json made
    invalid, and (`lock`) its directory made unreadable."""
    import shutil

    shutil.copytree(corpus, dest)
    for group in dest.glob("runs/*.zarr/privileged"):
        shutil.rmtree(group)
        group.mkdir()
        (group / "zarr.json").write_text("{ this is not json")
        if lock:
            group.chmod(0)
    return dest


@pytest.fixture
def no_default_model(monkeypatch, tmp_path):
    """The monitor as it is without a shipped model (checkpoint=None -> rule symptoms only), in this
    process and in the processes a test launches."""
    import diagnose.monitor

    missing = tmp_path / "no_default_model"
    monkeypatch.setenv("TEVID_DEFAULT_CHECKPOINT", str(missing))
    monkeypatch.setattr(diagnose.monitor, "DEFAULT_CHECKPOINT", missing)
    return missing


@pytest.fixture(scope="module")
def tiny_tevid(tmp_path_factory):
    """A random tiny TEViD saved as fine-tuning saves it, with a window of 4 frames: make(thresholds, tau, name, gate=0)."""
    from diagnose.calibrate import Calibration, save_calibration
    from diagnose.tevid import TEViD, TEViDConfig
    from pretrain.checkpoint import save_checkpoint
    from pretrain.clips import CLASSES

    def make(thresholds, tau, name, gate=0):
        torch.manual_seed(0)
        cfg = TEViDConfig(encoder="tiny", encoder_overrides={"depth": 1}, readout_dim=8, hidden_dim=16)
        path = save_checkpoint(tmp_path_factory.mktemp(name) / "final", model=TEViD(cfg),
                               config={"model": dataclasses.asdict(cfg), "data": {"window": 4}}, step=0)
        save_calibration(Calibration(list(CLASSES), thresholds, 1.0, tau, 3, gate=gate), path)
        return path

    return make
