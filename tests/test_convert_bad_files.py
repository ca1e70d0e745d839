"""`diffinject-convert adm` on files that are not checkpoints: one message naming the file and what it is
(exit code 2), never a bare `EOFError` or the "custom objects" refusal meant for real pickles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffinject.convert.cli import main


def convert(path: Path, tmp_path: Path, capsys) -> str:
    assert main(["adm", str(path), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffinject-convert: error: {path}") and not (tmp_path / "export").exists()
    return err


def test_a_zero_byte_file_is_called_empty(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ema_0.9999_500000.pt"
    path.write_bytes(b"")
    assert "is empty (0 bytes), not a checkpoint" in convert(path, tmp_path, capsys)


@pytest.mark.parametrize("text", ['{"model": "ffhq"}\n', "<!DOCTYPE html><html>Not Found</html>\n"])
def test_a_text_file_is_not_a_checkpoint_not_custom_objects(tmp_path: Path, capsys, text: str) -> None:
    path = tmp_path / "model.pt"
    path.write_text(text)
    err = convert(path, tmp_path, capsys)
    assert "is not a PyTorch checkpoint" in err and "this file is text starting with" in err
    assert "custom objects" not in err


def test_a_git_lfs_pointer_says_so(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.pt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00ff\nsize 5000\n")
    assert "is a Git LFS pointer (" in convert(path, tmp_path, capsys)


def test_a_truncated_checkpoint_is_called_truncated_or_corrupted(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:3000])
    err = convert(path, tmp_path, capsys)
    assert "is not a readable PyTorch checkpoint — truncated or corrupted" in err
