"""Bad images and layout contradictions in folder datasets: each is an error naming the file and the rule,
or (under `on_bad_image='skip'`) dropped with a logged count; conversions are logged once per split."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffinject.data import FolderDataModule
from diffinject.data.datasets import BadImageError
from test_data_folder import _dm, _png, make_tree

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _garble_pixels(path: Path) -> None:
    """Flip bytes inside the IDAT data and recompute every CRC: header and checksums stay valid."""
    raw, out, pos = path.read_bytes(), [PNG_SIGNATURE], 8
    while pos < len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind, data = raw[pos + 4 : pos + 8], bytearray(raw[pos + 8 : pos + 8 + length])
        if kind == b"IDAT":
            for j in range(2, len(data) - 4, 3):
                data[j] ^= 0xA5
        out.append(_chunk(kind, bytes(data)))
        pos += 12 + length
    path.write_bytes(b"".join(out))


def _bomb_header(path: Path, side: int = 30_000) -> None:
    """A PNG whose header claims side×side pixels (no real pixel data)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"") + _chunk(b"IEND", b""))


def test_corrupt_pixels_behind_a_valid_header_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = make_tree(tmp_path)
    broken = dataset / "1pct" / "align" / "1" / "4_1_1.png"
    _garble_pixels(broken)
    with Image.open(broken) as image:
        image.verify()  # the header and the CRCs pass PIL's integrity check
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm = _dm(tmp_path, on_bad_image="skip")
        dm.setup("fit")
    assert len(dm.train_eval_dataset) == 5
    assert "dropped 1 unreadable image(s)" in caplog.text and "4_1_1.png" in caplog.text
    errors = _dm(tmp_path, augment=False)
    errors.setup("fit")
    with pytest.raises(BadImageError, match="4_1_1.png"):
        errors.train_eval_dataset[4]


def test_truncated_jpeg_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = make_tree(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = dataset / "1pct" / "align" / "0" / "9_0_0.jpg"
    Image.fromarray(pixels).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm = _dm(tmp_path, on_bad_image="skip")
        dm.setup("fit")
    assert len(dm.train_eval_dataset) == 6 and "9_0_0.jpg" in caplog.text


def test_decompression_bomb_is_refused_naming_file_and_pixels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = make_tree(tmp_path)
    bomb = dataset / "1pct" / "align" / "0" / "1_0_0.png"
    _bomb_header(bomb)
    with pytest.raises(BadImageError, match=r"1_0_0\.png.*900000000 pixels.*decompression"):
        _dm(tmp_path).setup("fit")
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm = _dm(tmp_path, on_bad_image="skip")
        dm.setup("fit")
    assert (
        len(dm.train_eval_dataset) == 5 and "1_0_0.png" in caplog.text and "900000000 pixels" in caplog.text
    )


def test_images_above_the_warning_limit_are_refused_not_warned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, size=40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40×40 = 1600: PIL only warns below 2000
    dm = _dm(tmp_path, augment=False)
    with pytest.raises(BadImageError, match=r"0_0_1\.png.*1600 pixels.*limit of 1000"):
        dm.setup("fit")
        dm.train_eval_dataset[0]


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    ramp = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    path = dataset / "1pct" / "align" / "0" / "1_0_0.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    for channels in (1, 3):
        dm = _dm(tmp_path, augment=False, channels=channels)
        dm.setup("fit")
        image = (dm.train_eval_dataset[1]["image"] * 255).round().to(int)
        assert image.shape == (channels, 16, 16)
        assert image[0].flatten().tolist() == list(range(256))  # v·257 → v, the whole 8-bit range


def test_bias_outside_the_bias_classes(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    _png(dataset / "1pct" / "conflict" / "0" / "50_0_5.png")
    with pytest.raises(ValueError, match=r"bias 5 is outside \[0, 2\).*50_0_5\.png.*num_bias_classes"):
        _dm(tmp_path).setup("fit")
    dm = _dm(tmp_path, num_bias_classes=6)
    dm.setup("fit")
    assert 5 in dm.train_eval_dataset.biases.tolist()


@pytest.mark.parametrize(
    ("where", "rule"),
    [
        ("1pct/align/1/50_0_0.png", r"label 0 .*class folder '1'"),
        ("1pct/align/0/50_0_1.png", r"under align/.*label 0 != bias 1"),
        ("1pct/conflict/1/50_1_1.png", r"under conflict/.*label 1 == bias 1"),
        ("1pct/valid/0/50_1_0.png", r"label 1 .*class folder '0'"),
        ("test/1/50_0_0.png", r"label 0 .*class folder '1'"),
    ],
)
def test_file_contradicting_its_folder(tmp_path: Path, where: str, rule: str) -> None:
    dataset = make_tree(tmp_path)
    _png(dataset / where)
    dm = _dm(tmp_path)
    with pytest.raises(ValueError, match=rf"{rule}.*{where.split('/')[-1]}"):
        dm.setup("fit")
        dm.setup("test")


def test_conversions_are_logged_once_per_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = make_tree(tmp_path, size=16)
    train = dataset / "1pct" / "align"
    Image.new("RGBA", (16, 16), (1, 2, 3, 4)).save(train / "0" / "1_0_0.png")
    Image.new("L", (16, 16), 7).save(train / "0" / "2_0_0.png")
    Image.new("L", (16, 16), 9).save(train / "1" / "4_1_1.png")
    Image.new("RGB", (30, 30)).save(train / "1" / "5_1_1.png")
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm = _dm(tmp_path)
        dm.setup("fit")
        dm.train_dataloader()
    lines = [r.getMessage() for r in caplog.records if "converted" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "1 RGBA" in lines[0] and "2 grayscale" in lines[0] and "to RGB" in lines[0]
    assert "resized 1 image(s) from 30x30 to 16x16" in lines[0] and "training split" in lines[0]
    gray = dm.train_eval_dataset[2]["image"]
    assert gray.shape == (3, 16, 16) and float(gray.max()) == pytest.approx(7 / 255)


def test_folder_module_rejects_bad_num_bias_classes() -> None:
    with pytest.raises(ValueError, match="num_bias_classes"):
        FolderDataModule("data", "x", "1pct", num_classes=3, num_bias_classes=0)
