"""Injection stage reliability: weights fingerprint on resume, temp files, broken info files, meaningless
settings, batch-size independence and the bounded content cache.

An untrained tiny UNet is enough here (nothing is compared with a reconstruction): the checks are
bit-for-bit equalities and errors, so no training fixture is needed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffinject.cli import main
from diffinject.data import CMNISTDataModule
from diffinject.nets.unet import load_unet_export
from diffinject.stages import InjectionPredictModule
from inject_helpers import tiny_unet, write_topk, write_unet_export

STEPS = 5  # τ = 0, 200, 400, 600, 800


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "unet"
    write_unet_export(tiny_unet(16, seed=0), path, image_size=28)
    return path


def _batch(n: int = 6) -> dict[str, torch.Tensor]:
    """Pairs over 4 contents (0 and 1 repeated), fixed per-sample seeds, 28 px images in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    contents = torch.rand(4, 3, 28, 28, generator=g)
    ids = torch.tensor([0, 1, 0, 2, 3, 1, 2, 0][:n])
    return {
        "style_image": torch.rand(n, 3, 28, 28, generator=g),
        "content_image": contents[ids],
        "content_index": ids,
        "noise_seed": torch.arange(n) + 100,
    }


def _part(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _module(export: Path, **kwargs: object) -> InjectionPredictModule:
    return InjectionPredictModule(str(export), steps=STEPS, gamma=0.7, t_edit=400, t_boost=200, **kwargs)


# --------------------------------------------------------------------------------- batch-size independence
def test_pixels_do_not_depend_on_how_samples_are_batched(export: Path) -> None:
    batch = _batch(6)
    with torch.no_grad():
        whole = _module(export, micro_batch=4).inject(batch)  # chunks of 4 + 2 (padded)
        split = _module(export, micro_batch=4)
        parts = torch.cat([split.inject(_part(batch, slice(0, 3))), split.inject(_part(batch, slice(3, 6)))])
        one_by_one = _module(export, micro_batch=4)
        singles = torch.cat([one_by_one.inject(_part(batch, slice(i, i + 1))) for i in range(6)])
        reference = _module(export, micro_batch=4, cache_content=False, shared_encoder=True).inject(batch)
    assert torch.equal(parts, whole) and torch.equal(singles, whole)
    assert torch.equal(reference, whole)  # cached h == re-inverted h, bit for bit


def test_settings_validation_of_the_batching_options(export: Path) -> None:
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        _module(export, micro_batch=0)
    with pytest.raises(ValueError, match="content_cache_mb must be >= 0"):
        _module(export, content_cache_mb=-1.0)


# ------------------------------------------------------------------------------------------ content cache
def test_content_cache_is_bounded_preallocated_and_changes_no_pixel(
    export: Path, caplog: pytest.LogCaptureFixture
) -> None:
    batch = _batch(8)  # contents 0, 1, 2, 3
    entry = STEPS * 32 * 8 * 8 * 4 + 3 * 16 * 16 * 4  # h trajectory + x_T, fp32 bytes
    bounded = _module(export, micro_batch=8, content_cache_mb=2.5 * entry / 2**20)  # room for 2 contents
    unbounded = _module(export, micro_batch=8, content_cache_mb=None)
    with torch.no_grad(), caplog.at_level("INFO"):
        expected = unbounded.inject(batch)
        first = bounded.inject(batch)
        pool = bounded.content_cache.h
        second = bounded.inject(batch)
    cache = bounded.content_cache
    assert cache.size == 2 and cache.capacity == 2 and cache.nbytes == 2 * entry
    assert cache.recomputed == 4  # contents 2 and 3, re-inverted in each of the two batches
    assert cache.h is pool  # no reallocation or re-concatenation on the second batch
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert "content cache full: 2 contents cached" in caplog.text
    assert unbounded.content_cache.size == 4

    none = _module(export, micro_batch=8, content_cache_mb=0)
    with torch.no_grad():
        assert torch.equal(none.inject(batch), expected)
    assert none.content_cache.size == 0 and none.content_cache.h is None


def test_content_cache_allocates_once_for_the_expected_contents(export: Path) -> None:
    module = _module(export, micro_batch=4)
    module.content_cache.reserve(4)
    batch = _batch(8)
    with torch.no_grad():
        module.inject(_part(batch, slice(0, 2)))  # contents 0, 1
        pool = module.content_cache.h
        assert module.content_cache.capacity == 4 and module.content_cache.size == 2
        module.inject(_part(batch, slice(2, 8)))  # adds 2, 3
    assert module.content_cache.h is pool and module.content_cache.size == 4
    # rows hold exactly the inversion of each content (entry i = h at τ_i), in first-seen order
    h, slots, latent = module.content_h([3, 0], batch["content_image"][[4, 0]])
    assert torch.equal(slots, torch.tensor([3, 0])) and h.shape == (4, STEPS, 32, 8, 8)
    assert latent.shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------------- meaningless settings
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 50, "t_edit": 990}, "t_edit=990 is above the last DDIM grid step 980"),
        ({"steps": 10, "t_edit": 950}, "above the last DDIM grid step 900"),
        ({"steps": 10, "t_edit": 410, "t_start": 490}, "no grid step in the window 410 <= t <= 490"),
        ({"steps": 10, "t_edit": 400, "t_start": 500, "inject_every": 3}, "inject_every=3"),
        (
            {"gamma": 0.0, "guidance_scale": 0.1, "bias_model": "x.ckpt", "guidance_t_min": 910},
            "guidance window 910 <= t <= None holds no DDIM grid step",
        ),
        (
            {"gamma": 0.0, "guidance_scale": 0.1, "bias_model": "x.ckpt", "guidance_t_min": 300,
             "guidance_t_max": 200},
            "need 0 <= guidance_t_min <= guidance_t_max",
        ),
    ],
)  # fmt: skip
def test_settings_that_would_never_apply_are_refused(export: Path, kwargs: dict, match: str) -> None:
    kwargs = {"steps": 10, "t_boost": 200, **kwargs}
    with pytest.raises(ValueError, match=match):
        InjectionPredictModule(str(export), **kwargs)


def test_gamma_zero_needs_no_injection_window(export: Path) -> None:
    InjectionPredictModule(str(export), steps=10, gamma=0.0, t_edit=950)  # nothing asked, nothing refused


# --------------------------------------------------------------------------------------------- info file
@pytest.mark.parametrize(
    ("text", "match"),
    [('{"num_train_timesteps": 1000,', "is not valid JSON"), ("[1, 2]", "holds a JSON list, not an object")],
)
def test_broken_diffusion_info_is_named(export: Path, tmp_path: Path, text: str, match: str) -> None:
    broken = tmp_path / "unet"
    shutil.copytree(export, broken)
    (broken / "diffusion_info.json").write_text(text)
    pattern = rf"{broken}/diffusion_info\.json {match}.*expected the JSON object the diffusion stage writes"
    with pytest.raises(ValueError, match=pattern):
        InjectionPredictModule(str(broken))
    with pytest.raises(ValueError, match=pattern):
        load_unet_export(broken)


# ------------------------------------------------------------------------------- resume: weights, temps
def _config(root: Path, export: Path, batch_size: int = 3) -> Path:
    out = root / "inject"
    config = {
        "return_predictions": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "default_root_dir": str(out), "enable_progress_bar": False,
            "logger": False,
            "callbacks": [{"class_path": "diffinject.callbacks.SyntheticImageWriter",
                           "init_args": {"output_dir": str(out), "grid_samples": 0}}],
        },
        "model": {"class_path": "InjectionPredictModule",
                  "init_args": {"unet": str(export), "steps": STEPS, "gamma": 0.7, "t_boost": 200}},
        "data": {
            "class_path": "InjectionPairsDataModule",
            "init_args": {
                "data": {"class_path": "CMNISTDataModule",
                         "init_args": {"root": str(root / "data"), "source": "embedded", "ratio": 0.01}},
                "topk": str(root / "topk.csv"), "ratio": 0.002, "k": 2, "batch_size": batch_size,
            },
        },
    }  # fmt: skip
    path = root / "inject.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


@pytest.fixture(scope="module")
def pairs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embedded CMNIST and a hand-made top-K file (7 synthetic samples at ratio 0.002)."""
    root = tmp_path_factory.mktemp("pairs")
    data = CMNISTDataModule(root=str(root / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    write_topk(root / "topk.csv", train.labels, train.biases, k=2)
    return root


def _run_root(pairs_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A fresh run folder sharing the data: (export, config) with the seed-0 tiny UNet exported."""
    for name in ("data", "topk.csv", "topk_scores.csv"):
        (tmp_path / name).symlink_to(pairs_root / name)
    export = tmp_path / "unet"
    write_unet_export(tiny_unet(16, seed=0), export, image_size=28)
    return export, _config(tmp_path, export)


def test_resume_removes_temp_files_left_by_a_kill(pairs_root: Path, tmp_path: Path) -> None:
    export, cfg = _run_root(pairs_root, tmp_path)
    out = tmp_path / "inject"
    main(["predict", "--config", str(cfg)])
    first = _pixels(out)
    assert len(first) == 7
    # a kill mid-write: two samples lost, temp files of every writer left behind, the manifest gone
    for name in ("1.png", "5.png"):
        (out / "images" / name).unlink()
    (out / "manifest.csv").unlink()
    temps = [out / "images" / ".1.png.tmp4242", out / "images" / ".5.png.tmp7", out / ".manifest.csv.tmp4242",
             out / ".pairs.csv.tmp99", out / ".settings.json.tmp"]  # fmt: skip
    for temp in temps:
        temp.write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")  # not ours: kept
    main(["predict", "--config", str(cfg)])
    assert not [t for t in temps if t.exists()] and (out / "notes.txt").read_text() == "mine"
    assert _pixels(out).keys() == first.keys()


def test_resume_refuses_other_weights_with_the_same_step_count(pairs_root: Path, tmp_path: Path) -> None:
    export, cfg = _run_root(pairs_root, tmp_path)
    out = tmp_path / "inject"
    main(["predict", "--config", str(cfg)])
    first = _pixels(out)
    settings = json.loads((out / "settings.json").read_text())
    weights = (export / "diffusion_pytorch_model.safetensors").read_bytes()
    assert settings["unet_weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert settings["micro_batch"] == 3

    # same weights written again (new mtime) and another batch size: accepted, same pixels for survivors
    for name in ("1.png", "5.png"):
        (out / "images" / name).unlink()
    write_unet_export(tiny_unet(16, seed=0), export, image_size=28)
    with pytest.warns(UserWarning, match="micro_batch 3 → 2"):
        main(["predict", "--config", str(_config(tmp_path, export, batch_size=2))])
    resumed = _pixels(out)
    assert resumed.keys() == first.keys()
    assert all(np.array_equal(resumed[k], first[k]) for k in first if k not in ("1.png", "5.png"))

    # retrained to the same step count (global_step 300 in both): refused, not mixed in
    (out / "images" / "2.png").unlink()
    write_unet_export(tiny_unet(16, seed=1), export, image_size=28)
    with pytest.raises(ValueError, match=r"other UNet weights: .*unet now has sha256 .*step 300 → 300"):
        main(["predict", "--config", str(cfg)])
    assert not (out / "images" / "2.png").exists()

    # a folder written before fingerprints existed: resumed with a warning, fingerprint recorded
    old = json.loads((out / "settings.json").read_text())
    old.pop("unet_weights_sha256"), old.pop("micro_batch")
    (out / "settings.json").write_text(json.dumps(old))
    with pytest.warns(UserWarning, match="predates micro_batch, unet_weights_sha256"):
        main(["predict", "--config", str(cfg)])
    assert "unet_weights_sha256" in json.loads((out / "settings.json").read_text())
