"""Issue 20 §4, the smaller cases: an empty batch logs no grid (no division by zero), a PNG is fsynced before
its rename, LfF refuses to resume EMAs of another training set, and UNet exports load safetensors explicitly
(a pickled `.bin` with a warning, its payload never run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from lightning.pytorch.loggers import TensorBoardLogger

from diffinject.callbacks.synthetic_writer import save_png_atomic
from diffinject.nets.unet import INFO_FILENAME, build_unet, load_unet_export
from diffinject.stages import LfFClassifier
from diffinject.stages.image_grid import image_grid, log_image_grid
from test_classifiers import ARGS


def test_an_empty_batch_logs_no_grid(tmp_path: Path) -> None:
    empty = torch.zeros(0, 3, 8, 8)
    with pytest.warns(UserWarning, match="no images to log as 'samples/ema_ddim' at step 3"):
        assert log_image_grid([TensorBoardLogger(tmp_path)], "samples/ema_ddim", empty, 3) is False
    with pytest.raises(ValueError, match="image_grid got no images"):
        image_grid(empty)


def test_a_png_is_fsynced_before_it_is_renamed(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, int, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        stat = os.fstat(fd)
        events.append(("fsync", stat.st_ino, stat.st_size))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", os.stat(src).st_ino, os.stat(src).st_size))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_png_atomic(torch.full((3, 8, 8), 200, dtype=torch.uint8), tmp_path / "0.png")
    renamed = [e for e in events if e[0] == "replace"]
    assert len(renamed) == 1
    _, inode, size = renamed[0]
    assert ("fsync", inode, size) in events[: events.index(renamed[0])]  # the whole PNG, before the rename
    assert size == (tmp_path / "0.png").stat().st_size > 0


def test_lff_refuses_to_resume_emas_of_another_training_set() -> None:
    model = LfFClassifier(**ARGS)
    model.num_train = 6  # what setup("fit") reads from the data module
    ema = {"loss_b": torch.ones(4), "loss_d": torch.ones(4), "label": torch.zeros(4, dtype=torch.long)}
    model.on_load_checkpoint({"diffinject": {"lff_ema": ema}})
    with pytest.raises(
        ValueError, match=r"EMAs for another training set \(loss_b \(4,\), loss_d \(4,\)"
    ) as err:
        model.on_fit_start()
    assert "this data module has 6 training images, shape (6,)" in str(err.value)
    model.on_load_checkpoint({"diffinject": {"lff_ema": {k: v[:2].repeat(3) for k, v in ema.items()}}})
    model.on_fit_start()  # the same size: restored
    assert torch.equal(model.ema["loss_b"], torch.ones(6)) and torch.equal(
        model.ema["seen_b"], torch.zeros(6)
    )


def _export(folder: Path, safe: bool) -> UNet2DModel:
    torch.manual_seed(0)
    unet = build_unet("cmnist-small")
    unet.save_pretrained(folder, safe_serialization=safe)
    (folder / INFO_FILENAME).write_text(json.dumps({"image_size": 32}))
    return unet


def test_unet_exports_load_safetensors_explicitly_and_warn_on_a_pickle(tmp_path: Path, monkeypatch) -> None:
    calls: list[dict] = []
    real = UNet2DModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DModel, "from_pretrained", classmethod(spy))
    _export(tmp_path / "safe", safe=True)
    load_unet_export(tmp_path / "safe")
    assert calls[-1]["use_safetensors"] is True

    saved = _export(tmp_path / "pickled", safe=False)
    with pytest.warns(UserWarning, match="loading pickled weights diffusion_pytorch_model.bin"):
        unet, _ = load_unet_export(tmp_path / "pickled")
    assert calls[-1]["use_safetensors"] is False
    loaded = unet.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    assert all(torch.equal(value, loaded[key]) for key, value in saved.state_dict().items())


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_pickled_payload_in_a_bin_export_does_not_run(tmp_path: Path) -> None:
    folder, marker = tmp_path / "evil", tmp_path / "ran"
    _export(folder, safe=False)
    torch.save({"conv_in.weight": _Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.warns(UserWarning, match="pickled weights"), pytest.raises(OSError, match="Unable to load"):
        load_unet_export(folder)
    assert not marker.exists()  # torch.load(weights_only=False) would have created it
