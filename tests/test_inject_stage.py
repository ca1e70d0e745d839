"""Injection stage end to end on embedded Colored MNIST with a tiny trained UNet (16 px model space).

The UNet is trained for a few hundred steps on a handful of digits inside a module fixture (~5-10 s), so the
DDIM paths are smooth enough for float-tolerance comparisons; images are 28 px in and out (resized to the
16 px model space and back).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffinject.callbacks.synthetic_writer import MANIFEST_COLUMNS
from diffinject.cli import main
from diffinject.data import CMNISTDataModule, InjectionPairsDataModule
from diffinject.diffusion import to_model_space
from diffinject.stages import InjectionPredictModule
from inject_helpers import train_tiny_unet, write_topk, write_unet_export

K = 2
RATIO = 0.005  # 18 of the 3,600 embedded training digits
STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inject")
    data = CMNISTDataModule(root=str(root / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    digits = torch.stack([train[i]["image"] for i in range(8)])
    unet = train_tiny_unet(to_model_space(digits, 16), steps=300)
    write_unet_export(unet, root / "runs/cmnist/1pct/diffusion/unet", image_size=28)
    (root / "runs/cmnist/1pct/bias").mkdir(parents=True)
    write_topk(root / "runs/cmnist/1pct/bias/topk.csv", train.labels, train.biases, k=K)
    return root


def _config(root: Path, out: str = "inject", **model: object) -> Path:
    run = root / f"runs/cmnist/1pct/{out}"
    config = {
        "return_predictions": False,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(run),
            "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(run.parent), "name": out, "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "diffinject.callbacks.SyntheticImageWriter",
                    "init_args": {"output_dir": str(run)},
                }
            ],
        },
        "model": {
            "class_path": "InjectionPredictModule",
            "init_args": {"unet": str(root / "runs/cmnist/1pct/diffusion/unet"), "steps": STEPS, **model},
        },
        "data": {
            "class_path": "InjectionPairsDataModule",
            "init_args": {
                "data": {
                    "class_path": "CMNISTDataModule",
                    "init_args": {"root": str(root / "data"), "source": "embedded", "ratio": 0.01},
                },
                "topk": str(root / "runs/cmnist/1pct/bias/topk.csv"),
                "ratio": RATIO,
                "k": K,
                "batch_size": 5,
            },
        },
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _manifest(run: Path) -> list[dict[str, str]]:
    with (run / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def _images(run: Path, rows: list[dict[str, str]]) -> dict[int, np.ndarray]:
    from PIL import Image

    return {int(r["index"]): np.asarray(Image.open(run / r["path"])).astype(int) for r in rows}


def test_predict_writes_complete_set_then_resumes(workdir: Path) -> None:
    cfg = _config(workdir)
    run = workdir / "runs/cmnist/1pct/inject"
    cli = main(["predict", "--config", str(cfg)])
    rows = _manifest(run)
    plan = cli.datamodule.plan
    n = int(RATIO * len(cli.datamodule.data.train_eval_dataset))
    assert [int(r["index"]) for r in rows] == list(range(n)) and len(plan) == n
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert not list(run.glob("manifest.rank*.csv"))
    pool = set(cli.datamodule.content_pool.tolist())
    assert len(pool) == 10 * K
    for r in rows:
        i = int(r["index"])
        assert (int(r["content_index"]), int(r["style_index"])) == (plan.content[i], plan.style[i])
        assert int(r["content_index"]) in pool and int(r["style_index"]) not in pool
        assert r["label"] == r["content_label"] and r["path"] == f"images/{i}.png"
    first = _images(run, rows)
    assert all(img.shape == (28, 28, 3) and img.dtype == int for img in first.values())
    assert (run / "settings.json").is_file() and list(run.glob("events.out.tfevents*"))

    # simulated interruption: merged manifest gone, half the PNGs gone, a leftover shard that also lists
    # samples whose PNG is gone (they must be redone, not trusted) and misses some that survived
    kept = [r for r in rows if int(r["index"]) % 2 == 0]
    for r in rows:
        if int(r["index"]) % 2:
            (run / r["path"]).unlink()
    (run / "manifest.csv").unlink()
    with (run / "manifest.rank1.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows[len(rows) // 2 :])
    mtimes = {r["path"]: (run / r["path"]).stat().st_mtime_ns for r in kept}

    main(["predict", "--config", str(cfg)])
    again = _manifest(run)
    assert again == rows  # same rows, no duplicate, no gap
    assert {p: (run / p).stat().st_mtime_ns for p in mtimes} == mtimes  # survivors were not recomputed
    second = _images(run, again)
    for i, img in first.items():
        # other batch composition (the resume batches only the missing samples): the very same pixels
        assert np.array_equal(img, second[i]), i

    # a rerun with nothing left to do keeps everything as it is
    main(["predict", "--config", str(cfg)])
    assert _manifest(run) == rows


def test_rerun_with_other_settings_is_refused(workdir: Path) -> None:
    main(["predict", "--config", str(_config(workdir, out="inject_settings"))])
    with pytest.raises(ValueError, match="other settings .*gamma"):
        main(["predict", "--config", str(_config(workdir, out="inject_settings", gamma=0.3))])


def _module_and_batch(workdir: Path, **kwargs: object) -> tuple[InjectionPredictModule, dict]:
    module = InjectionPredictModule(str(workdir / "runs/cmnist/1pct/diffusion/unet"), steps=STEPS, **kwargs)
    dm = InjectionPairsDataModule(
        CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01),
        str(workdir / "runs/cmnist/1pct/bias/topk.csv"), ratio=RATIO, k=K, batch_size=6,
    )  # fmt: skip
    dm.setup("predict")
    return module, next(iter(dm.predict_dataloader()))


def _split(batch: dict, sl: slice) -> dict:
    return {k: v[sl] for k, v in batch.items()}


def test_cached_shared_encoder_equals_naive(workdir: Path) -> None:
    fast, batch = _module_and_batch(workdir)
    naive, _ = _module_and_batch(workdir, shared_encoder=False, cache_content=False)
    with torch.no_grad():
        a = fast.inject(_split(batch, slice(0, 3)))
        b = fast.inject(_split(batch, slice(3, 6)))  # second batch reuses cached contents
        reference = naive.inject(batch)
    assert fast.content_cache.size == len(set(batch["content_index"].tolist()))
    torch.testing.assert_close(torch.cat([a, b]), reference, rtol=0, atol=2e-4)
    assert a.shape == (3, 3, 28, 28)


def test_gamma_zero_is_plain_regeneration_and_label_rule(workdir: Path) -> None:
    module, batch = _module_and_batch(workdir, gamma=0.0)
    strong, _ = _module_and_batch(workdir, gamma=1.0, mask_box=(0.25, 0.25, 0.75, 0.75))
    with torch.no_grad():
        plain = module.inject(batch)
        injected = strong.inject(batch)
    # γ = 0: the (stochastic, seeded) regeneration of the style alone — no content involved
    swapped = {
        **batch,
        "content_image": batch["content_image"].flip(0),
        "content_index": batch["content_index"] + 1,
    }
    module.clear_content_cache()
    with torch.no_grad():
        torch.testing.assert_close(module.inject(swapped), plain, rtol=0, atol=1e-5)
    assert (injected - plain).abs().mean() > 1e-3
    dm = InjectionPairsDataModule(
        CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01),
        str(workdir / "runs/cmnist/1pct/bias/topk.csv"), ratio=RATIO, k=K, label_from="style",
    )  # fmt: skip
    dm.setup("predict")
    item = dm.pairs[0]
    assert item["label"] == item["style_label"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"t_boost": 500, "t_edit": 400}, "t_boost <= t_edit"),
        ({"t_edit": 1200}, "t_edit <= T=1000"),
        ({"steps": 30}, "must divide T=1000"),
        ({"inject_every": 0}, "inject_every must be >= 1"),
        ({"mask_box": (0.5, 0.5, 0.2, 0.9)}, "top < bottom"),
    ],
)
def test_module_validates_settings(workdir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InjectionPredictModule(str(workdir / "runs/cmnist/1pct/diffusion/unet"), **kwargs)


def test_missing_inputs_name_the_stage(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"diffinject fit --config configs/cmnist/diffusion\.yaml"):
        InjectionPredictModule(str(tmp_path / "runs/cmnist/1pct/diffusion/unet"))
    data = CMNISTDataModule(root=str(workdir / "data"), source="embedded")
    with pytest.raises(FileNotFoundError, match=r"diffinject predict --config configs/cmnist/topk\.yaml"):
        InjectionPairsDataModule(data, str(tmp_path / "runs/cmnist/1pct/bias/topk.csv"))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(workdir: Path) -> None:
    one = _config(workdir, out="inject_one")
    two = _config(workdir, out="inject_two")
    for cfg, devices in ((one, 1), (two, 2)):
        command = [sys.executable, "-m", "diffinject", "predict", "--config", str(cfg)]
        command += ["--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto"]
        # one thread in both runs: on a CPU the thread count, like the batch shape, moves pixels by rounding
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workdir, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        if devices == 2:
            assert "MEMBER: 2/2" in done.stdout + done.stderr  # really two processes
    run_one, run_two = workdir / "runs/cmnist/1pct/inject_one", workdir / "runs/cmnist/1pct/inject_two"
    rows_one, rows_two = _manifest(run_one), _manifest(run_two)
    assert rows_one == rows_two
    images_one, images_two = _images(run_one, rows_one), _images(run_two, rows_two)
    for i, img in images_one.items():
        assert np.array_equal(img, images_two[i]), i  # fixed micro-batch shape: identical, not ±1


@pytest.mark.gpu
def test_cuda_matches_cpu_and_bf16_stays_close(workdir: Path) -> None:
    """bf16 generation moves pixels by < 0.03 on average (bound not yet validated on a GPU).

    Run alone (`pytest -m gpu tests/test_inject_stage.py`); conftest shows the device to `gpu` tests only and
    skips this one at run time when there is none.
    """
    cpu, batch = _module_and_batch(workdir)
    fp32, _ = _module_and_batch(workdir)
    bf16, _ = _module_and_batch(workdir, autocast=True)
    with torch.no_grad():
        reference = cpu.inject(batch)
        on_gpu = fp32.cuda().inject(batch).cpu()
        half = bf16.cuda().inject(batch).cpu()
    torch.testing.assert_close(on_gpu, reference, rtol=0, atol=2e-3)
    assert (half - on_gpu).abs().mean() < 0.03
