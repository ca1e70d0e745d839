"""The oracle row for Colored MNIST: the debias stage trained on what a perfect generator would give it.

For every row of the synthetic manifest a seed's debias stage trains on (`data.init_args.synthetic_manifest`
of `{run}/seed{S}/debias/pipeline_config.yaml`), the oracle image is the content digit's stroke coloured
exactly with the style image's bias attribute: the palette colour of the style's bias label, with the
dataset's own colour noise (`cmnist.sample_colors` / `cmnist.colorize`; row seed `(S, index)`). The stroke is
the grey MNIST digit before colouring when the data module can rebuild it (`grey_digits`, checked against
the coloured image), else recovered from the coloured image (an exported folder tree). Same rows (index,
content_index, style_index, label and the other columns), written like the inject stage's output to
`{run}/seed{S}/oracle/inject/` (`images/{index}.png`, `manifest.csv`). It reads bias labels and the palette,
so it is an analysis: it lives here, never in `src/`.

`--check` prints how many oracle images carry the style's palette colour (should be ~100 %) and how well
their foreground matches the content's; `--fit` reruns the seed's debias stage on the oracle manifest
(`oracle_fit.py`) and prints its test accuracies beside the seed's own. Resumable: rendering and fitting are
skipped when their records match. Run from the repository root (the stage configs' paths are relative to it):

    python benchmarks/oracle_synthetic.py --run runs/cmnist/1pct --seed 0 --check --fit
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from cmnist_synthetic_colour import colour_class  # sibling benchmarks: this folder is on sys.path
from diffinject.callbacks.synthetic_writer import save_png_atomic, write_manifest_atomic
from diffinject.data.cmnist import CMNISTDataModule, colorize, sample_colors
from diffinject.data.sections import source_data_section
from diffinject.report.synthetic import NON_DATA_ARGS, images_at, resolve_class
from oracle_fit import fit_oracle, stage_accuracies

REPO = Path(__file__).resolve().parents[1]
ROW_COLUMNS = ("index", "content_index", "style_index", "label")
VERSION = 1
#: `--check`: a pixel is foreground when its brightest channel is above this (cmnist_synthetic_colour's rule)
CHECK_THRESHOLD = 0.25


def debias_config(run: Path, seed: int) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """The seed's resolved debias config, its dataset section and the synthetic manifest it trains on."""
    path = run / f"seed{seed}" / "debias" / "pipeline_config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pipeline's debias stage for seed {seed} first")
    config = yaml.safe_load(path.read_text()) or {}
    section = source_data_section(config)
    manifest = ((section or {}).get("init_args") or {}).get("synthetic_manifest")
    if section is None or not manifest:
        raise ValueError(f"{path}: no data section with init_args.synthetic_manifest")
    if not Path(manifest).is_file():
        raise FileNotFoundError(f"{path}: synthetic manifest {manifest} not found (run from the repo root?)")
    return config, section, Path(manifest)


def build_data(section: dict[str, Any]) -> CMNISTDataModule:
    """The dataset the debias stage read, without its synthetic part (the training split is what the
    manifest's indices address)."""
    cls = resolve_class(section["class_path"])
    if not issubclass(cls, CMNISTDataModule):
        raise ValueError(f"the oracle knows the Colored MNIST palette only, got {section['class_path']}")
    dropped = ("synthetic_manifest", "synthetic_control")
    module = cls(**{k: v for k, v in (section.get("init_args") or {}).items() if k not in dropped})
    module.setup("fit")
    return module


def read_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    with manifest.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        rows = list(reader)
    missing = [c for c in (*ROW_COLUMNS, "path") if c not in header]
    if missing:
        raise ValueError(f"{manifest} lacks column(s) {', '.join(missing)}; found {header}")
    if not rows:
        raise ValueError(f"{manifest} has no rows (did the injection check accept none?): nothing to render")
    return header, rows


def check_rows(manifest: Path, rows: list[dict[str, str]], labels: np.ndarray, biases: np.ndarray) -> None:
    """The manifest must address this training split: indices inside it, its recorded labels and biases equal
    to the data's (else it was made for another dataset, ratio or seed, or `root` resolved elsewhere)."""
    for line, row in enumerate(rows, start=2):
        content, style = int(row["content_index"]), int(row["style_index"])
        if not (0 <= content < len(labels) and 0 <= style < len(labels)):
            raise ValueError(f"{manifest}, line {line}: index outside the training split of {len(labels)}")
        recorded = [("content_label", labels[content]), ("style_label", labels[style])]
        recorded += [("content_bias", biases[content]), ("style_bias", biases[style])]
        for column, value in recorded:
            if row.get(column) not in (None, "", "-1") and int(row[column]) != int(value):
                raise ValueError(
                    f"{manifest}, line {line}: {column} {row[column]} but the data says {int(value)}; "
                    "was it made for another dataset, ratio or seed?"
                )


def recover_strokes(coloured: np.ndarray) -> np.ndarray:
    """Grey strokes N×H×W from coloured N×3×H×W digits: the brightest channel over the image's peak (MNIST
    digits peak at 255), for data whose grey digits are not at hand."""
    bright = coloured.max(axis=1).astype(np.float64)
    peak = np.clip(bright.max(axis=(1, 2), keepdims=True), 1.0, None)
    return np.clip(np.rint(bright * 255.0 / peak), 0, 255).astype(np.uint8)


def strokes_match(strokes: np.ndarray, coloured: np.ndarray) -> bool:
    """Coloured pixels only where the stroke is set, and every stroke pixel >= 2 coloured (each palette
    colour's brightest channel is > 0.37, so 2 × it rounds to >= 1)."""
    lit = coloured.max(axis=1) > 0
    return bool(np.all(~lit | (strokes > 0)) and np.all(lit | (strokes < 2)))


def content_strokes(module: CMNISTDataModule, contents: np.ndarray) -> tuple[np.ndarray, str]:
    """The content digits' strokes and where they came from ("mnist" or "recovered")."""
    coloured = images_at(module.train_eval_dataset, contents)
    grey = module.grey_digits("train")
    if grey is None:
        return recover_strokes(coloured), "recovered"
    strokes = grey[contents]
    if not strokes_match(strokes, coloured):
        raise RuntimeError("the rebuilt grey digits do not match the coloured training images")
    return strokes, "mnist"


def render(
    strokes: np.ndarray, style_biases: np.ndarray, indices: np.ndarray, std: float, seed: int
) -> np.ndarray:
    """uint8 N×3×H×W: stroke i × (palette[style_biases[i]] + N(0, std²)), noise drawn from (seed, index)."""
    colours = [
        sample_colors(np.array([b]), std, np.random.default_rng([seed, int(i)]))
        for b, i in zip(style_biases, indices, strict=True)
    ]
    return colorize(strokes, np.concatenate(colours))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_oracle(
    run: Path, seed: int, section: dict[str, Any], source: Path, module: CMNISTDataModule
) -> dict[str, Any]:
    """Render the oracle set into `{run}/seed{S}/oracle/inject/` unless a finished one has the same record."""
    out = run / f"seed{seed}" / "oracle" / "inject"
    header, rows = read_rows(source)
    train = module.train_eval_dataset
    labels, biases = np.asarray(train.labels), np.asarray(train.biases)
    check_rows(source, rows, labels, biases)
    init = {k: v for k, v in (section.get("init_args") or {}).items() if k not in NON_DATA_ARGS}
    data = {"class_path": section["class_path"], "init_args": init}
    record = {"version": VERSION, "seed": seed, "source": str(source), "source_sha256": sha256(source)}
    record["data"] = json.loads(json.dumps(data, default=str))
    info_path, manifest = out / "oracle_info.json", out / "manifest.csv"
    if info_path.is_file() and manifest.is_file():
        info = json.loads(info_path.read_text())
        if {k: info.get(k) for k in record} == record and all(
            (out / r["path"]).is_file() for r in rows_of(out)
        ):
            return {**info, "rendered": 0}
    contents = np.array([int(r["content_index"]) for r in rows])
    styles = np.array([int(r["style_index"]) for r in rows])
    indices = np.array([int(r["index"]) for r in rows])
    strokes, kind = content_strokes(module, contents)
    images = render(strokes, biases[styles], indices, module.color_std, seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    written = []
    for row, image in zip(rows, images, strict=True):
        path = f"images/{int(row['index'])}.png"
        save_png_atomic(torch.from_numpy(image), out / path)
        written.append({**row, "path": path})
    write_manifest_atomic(manifest, written, columns=header)
    info = {**record, "strokes": kind, "rows": len(written), "manifest": str(manifest)}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return {**info, "rendered": len(written)}


def rows_of(folder: Path) -> list[dict[str, str]]:
    return read_rows(folder / "manifest.csv")[1]


def check(out: Path, module: CMNISTDataModule) -> dict[str, Any]:
    """Fraction of oracle images in the style's palette colour, and their foreground against the content's
    (exact equality misses only where a stroke value of 1 rounds to black under the darker of the two colours,
    e.g. palette colour 8, whose brightest channel is 0.39)."""
    rows = rows_of(out)
    train = module.train_eval_dataset
    styles = np.array([int(r["style_index"]) for r in rows])
    contents = np.array([int(r["content_index"]) for r in rows])
    images = np.stack([np.asarray(Image.open(out / r["path"]).convert("RGB")) for r in rows])
    colours = np.array([colour_class(image, CHECK_THRESHOLD) for image in images])
    fg = images.max(axis=-1) > 0
    content_fg = images_at(train, contents).max(axis=1) > 0
    iou = (fg & content_fg).sum(axis=(1, 2)) / np.clip((fg | content_fg).sum(axis=(1, 2)), 1, None)
    labels = np.array([int(r["label"]) for r in rows])
    return {
        "images": len(rows),
        "colour_is_style_colour": float((colours == np.asarray(train.biases)[styles]).mean()),
        "colour_differs_from_label": float((colours != labels).mean()),
        "foreground_equals_content": float((fg == content_fg).all(axis=(1, 2)).mean()),
        "foreground_iou_mean": float(iou.mean()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a run root, e.g. runs/cmnist/1pct")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument(
        "--fit", action="store_true", help="train and test the debias stage on the oracle set"
    )
    parser.add_argument("--check", action="store_true", help="colour and shape audit of the oracle images")
    parser.add_argument("--trainer", type=Path, default=REPO / "configs" / "trainer" / "cpu.yaml")
    args = parser.parse_args(argv)
    config, section, source = debias_config(args.run, args.seed)
    module = build_data(section)
    info = write_oracle(args.run, args.seed, section, source, module)
    result: dict[str, Any] = {
        "run": str(args.run),
        "seed": args.seed,
        "source_manifest": str(source),
        "oracle_manifest": info["manifest"],
        "rows": info["rows"],
        "rendered": info["rendered"],
        "strokes": info["strokes"],
    }
    if args.check:
        result["check"] = check(Path(info["manifest"]).parent, module)
    if args.fit:
        folder = args.run / f"seed{args.seed}"
        oracle = folder / "oracle" / "debias"
        result["oracle"] = fit_oracle(config, Path(info["manifest"]), oracle, args.trainer, args.seed)
        result["debias"] = stage_accuracies(folder / "debias")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
