"""samples.png: real images, unconditional DDIM samples of the run's diffusion export, synthetic triplets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffinject.report import write_report
from diffinject.report.samples import NUM_UNCONDITIONAL, unconditional_samples
from inject_helpers import tiny_unet, write_unet_export
from test_report import run_root  # noqa: F401 - the report tests' tiny run (fixture)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained 32 px UNet exported as the diffusion stage does (28 px data, padded)."""
    folder = tmp_path_factory.mktemp("diffusion") / "unet"
    write_unet_export(tiny_unet(size=32), folder, image_size=28)
    return folder


def _height(path: Path) -> int:
    with Image.open(path) as image:
        return image.size[1]


def test_unconditional_samples_are_seeded_and_at_the_data_size(export: Path) -> None:
    images, line = unconditional_samples(export, count=4, steps=5)
    again, _ = unconditional_samples(export, count=4, steps=5)
    assert images is not None and images.shape == (4, 3, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, again) and "4 DDIM samples (η = 0, S = 5, seed 0)" in line
    other, _ = unconditional_samples(export, count=4, steps=5, seed=1)
    assert not np.array_equal(images, other)


def test_unconditional_samples_skip_without_export_or_when_too_large(export: Path, tmp_path: Path) -> None:
    images, line = unconditional_samples(tmp_path / "unet")
    assert images is None and "no diffusion export" in line
    images, line = unconditional_samples(export, max_cpu_size=16)
    assert images is None and "32 px UNet with 1 MB of weights is too slow to sample on a CPU" in line
    images, line = unconditional_samples(export, max_cpu_bytes=1000)
    assert images is None and "(limits 64 px, 0 MB)" in line


def test_unconditional_samples_are_cached_per_export(export: Path, tmp_path: Path) -> None:
    images, line = unconditional_samples(export, count=2, steps=4, cache_dir=tmp_path)
    cached, cached_line = unconditional_samples(export, count=2, steps=4, cache_dir=tmp_path)
    assert np.array_equal(images, cached) and cached_line == f"{line} (cached)"
    assert len(list(tmp_path.glob("ddim_samples_*.npy"))) == 1
    unconditional_samples(export, count=2, steps=5, cache_dir=tmp_path)  # other settings: another entry
    assert len(list(tmp_path.glob("ddim_samples_*.npy"))) == 2


def test_report_draws_ddim_block_from_the_run_export(
    run_root: Path,  # noqa: F811 - the imported fixture
    export: Path,
) -> None:
    without = write_report(run_root, seeds=[0, 1])
    figure = run_root / "report" / "samples.png"
    assert without["figures"]["samples"] == str(figure) and figure.is_file()
    assert any("samples.png has no DDIM samples: no diffusion export" in n for n in without["notes"])
    height_without = _height(figure)  # real + style / content / synthetic

    shutil.copytree(export, run_root / "diffusion" / "unet")
    try:
        with_export = write_report(run_root, seeds=[0, 1])
    finally:
        shutil.rmtree(run_root / "diffusion" / "unet")
    assert not any("no DDIM samples" in n for n in with_export["notes"])
    rows_without, rows_with = 4, 4 + NUM_UNCONDITIONAL // 8
    assert _height(figure) == pytest.approx(height_without * rows_with / rows_without, rel=0.1)


def test_report_without_export_or_manifest_writes_no_samples(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    (root / "seed0" / "vanilla").mkdir(parents=True)
    result = write_report(root)
    assert result["figures"]["samples"] is None and not (root / "report" / "samples.png").exists()
    assert any("samples.png not written" in n for n in result["notes"])


def test_report_notes_that_a_control_did_not_train_on_the_measured_set(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    config = {
        "model": {"class_path": "LfFClassifier", "init_args": {"lr": 0.001}},
        "data": {"class_path": "CMNISTDataModule", "init_args": {"synthetic_control": "shuffle_labels"}},
    }
    (root / "seed0" / "debias").mkdir(parents=True)
    (root / "seed0" / "debias" / "pipeline_config.yaml").write_text(yaml.safe_dump(config))
    result = write_report(root)
    assert result["configs"]["knobs"]["debias"]["synthetic_control"] == "shuffle_labels"
    assert any("trained with synthetic_control=shuffle_labels" in n for n in result["notes"])
    assert "synthetic_control=shuffle_labels" in (root / "report" / "results.md").read_text()
