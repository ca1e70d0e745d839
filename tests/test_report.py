"""The report: numbers against hand computations, synthetic-set measurements, missing and broken inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from diffinject.data import CMNISTDataModule
from diffinject.data.cmnist import LFF_COLORS, colorize
from diffinject.measures import synthetic_set
from diffinject.report import json_safe, main, write_report
from diffinject.report.inputs import COLUMNS, COMPARED, METHODS, collect_method, collect_timings, knobs_of
from diffinject.report.render import FEWER_NOTE, accuracy_plot, percent_of

METRICS = {  # stage → per-seed (overall, aligned, conflicting, worst class (conflicting), val acc)
    "vanilla": [(0.40, 0.99, 0.33, 0.00, 0.97), (0.44, 1.00, 0.38, 0.10, 0.98)],
    "lff": [(0.58, 0.90, 0.54, 0.20, 0.90), (0.56, 0.86, 0.52, 0.10, 0.88)],
    "bias": [(0.28, 1.00, 0.20, 0.00, 0.97), (0.30, 1.00, 0.22, 0.00, 0.98)],
    "debias": [(0.66, 0.95, 0.62, 0.30, 0.93), (0.70, 0.97, 0.67, 0.40, 0.95)],
}
TIMINGS = {
    "seed0/vanilla": 10.0,
    "seed1/vanilla": 12.0,
    "seed0/inject": 30.0,
    "seed1/inject": 31.0,
    "diffusion": 100.0,
}
#: seed → manifest rows (positions in the hand-made pool below); rows 0-7 get the style's (conflicting)
#: colour, rows 8-11 their own label's colour.
SEED_ROWS = {0: list(range(12)), 1: [0, 1, 2, 3, 4, 5, 8, 9, 10, 11]}


def metrics_payload(stage: str, values: tuple[float, ...], seed: int) -> dict[str, Any]:
    acc, aligned, conflicting, worst_class, val = values
    return {
        "stage": stage,
        "test": {
            "test/acc": acc,
            "test/acc_aligned": aligned,
            "test/acc_conflicting": conflicting,
            "test/acc_conflicting_worst_class": worst_class,
            "test/acc_worst_group": 0.0,  # as at 1 %: some small group is always at 0 %
            "test/acc_group_mean": acc,
        },
        "val": {"val/acc": val, "epoch": 3},
        "checkpoint": "best.ckpt",
        "checkpoint_epoch": 3,
        "seed": seed,
        "hparams": {},
    }


def write_yaml(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(payload, sort_keys=False))


def recolour(image: np.ndarray, colour_class: int) -> np.ndarray:
    """A CMNIST image's digit (peak rescaled to 255) in another exact palette colour."""
    gray = image.max(axis=0).astype(np.float32)
    gray = np.rint(gray * 255.0 / gray.max()).astype(np.uint8)
    return colorize(gray[None], LFF_COLORS[[colour_class]])[0]


def build_pool(train: Any) -> list[dict[str, Any]]:
    """12 (content, style, colour) triples: aligned contents of every class, aligned styles of others."""
    labels, biases = train.labels, train.biases
    rows = []
    for i in range(12):
        label, style_class = i % 10, (i % 10 + 1 + i % 3) % 10
        content = int(np.flatnonzero((labels == label) & (biases == label))[i // 10])
        style = int(np.flatnonzero((labels == style_class) & (biases == style_class))[i])
        colour = style_class if i < 8 else label
        rows.append({"content": content, "style": style, "label": label, "colour": colour})
    return rows


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    root = base / "cmnist" / "1pct"
    data_args = {"root": str(base / "data"), "ratio": 0.01, "source": "embedded", "batch_size": 64}
    module = CMNISTDataModule(**data_args)
    module.setup("fit")
    train = module.train_eval_dataset
    images = train.images.numpy()
    pool = build_pool(train)
    for seed in (0, 1):
        for stage, per_seed in METRICS.items():
            folder = root / f"seed{seed}" / stage
            folder.mkdir(parents=True)
            (folder / "metrics.json").write_text(json.dumps(metrics_payload(stage, per_seed[seed], seed)))
            model = {"class_path": "DebiasClassifier" if stage == "debias" else "VanillaClassifier",
                     "init_args": {"arch": "mlp", "lr": 0.001, "loss": "ce"}}  # fmt: skip
            data = {"class_path": "CMNISTDataModule", "init_args": data_args}
            write_yaml(
                folder / "pipeline_config.yaml", {"trainer": {"max_epochs": 5}, "model": model, "data": data}
            )
        topk = {
            "k": 10,
            "per_class": True,
            "precision": [0.34, 0.36][seed],
            "recall": 0.8,
            "max_precision": 0.4,
        }
        (root / f"seed{seed}" / "bias" / "topk_summary.json").write_text(json.dumps(topk))
        inject = root / f"seed{seed}" / "inject"
        (inject / "images").mkdir(parents=True)
        lines = [
            "index,content_index,style_index,label,content_label,style_label,content_bias,style_bias,path"
        ]
        for n, row in enumerate(pool[r] for r in SEED_ROWS[seed]):
            picture = recolour(images[row["content"]], row["colour"])
            Image.fromarray(picture.transpose(1, 2, 0)).save(inject / "images" / f"{n}.png")
            c, s = row["content"], row["style"]
            lines.append(f"{n},{c},{s},{row['label']},{train.labels[c]},{train.labels[s]},{train.biases[c]},"
                         f"{train.biases[s]},images/{n}.png")  # fmt: skip
        (inject / "manifest.csv").write_text("\n".join(lines) + "\n")
        inject_config = {
            "model": {"class_path": "InjectionPredictModule",
                      "init_args": {"unet": "r/diffusion/unet", "steps": 50, "gamma": 0.7, "t_edit": 400,
                                    "t_boost": 200, "mask_box": None}},
            "data": {"class_path": "InjectionPairsDataModule",
                     "init_args": {"data": {"class_path": "CMNISTDataModule", "init_args": data_args},
                                   "topk": "r/bias/topk.csv", "ratio": 0.1, "k_source": "per_class", "k": 10,
                                   "style_pool": "rest", "label_from": "content", "seed": seed}},
        }  # fmt: skip
        write_yaml(inject / "pipeline_config.yaml", inject_config)
    diffusion = {"trainer": {"max_steps": 2500}, "model": {"class_path": "P2DiffusionModule",
                 "init_args": {"unet_preset": "cmnist-small", "p2_gamma": 1.0}}}  # fmt: skip
    write_yaml(root / "diffusion" / "pipeline_config.yaml", diffusion)
    (root / "timings.json").write_text(json.dumps(TIMINGS))
    return root


@pytest.fixture(scope="module")
def report(run_root: Path) -> dict[str, Any]:
    write_report(run_root, seeds=[0, 1])
    return json.loads((run_root / "report" / "results.json").read_text())


def sample_std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_accuracy_mean_and_sample_std(report: dict[str, Any]) -> None:
    for stage, per_seed in METRICS.items():
        entry = report["methods"][stage]
        assert entry["n"] == 2 and entry["seeds"] == [0, 1]
        for column, key in enumerate(
            ("test/acc", "test/acc_aligned", "test/acc_conflicting", "test/acc_conflicting_worst_class")
        ):
            values = [per_seed[0][column], per_seed[1][column]]
            assert entry[key]["mean"] == pytest.approx(sum(values) / 2)
            assert entry[key]["std"] == pytest.approx(sample_std(values))
        assert entry["val/acc"]["mean"] == pytest.approx((per_seed[0][4] + per_seed[1][4]) / 2)
    assert report["topk"]["precision"]["mean"] == pytest.approx(0.35)
    assert report["topk"]["precision"]["std"] == pytest.approx(sample_std([0.34, 0.36]))
    assert report["unbiased_column"] == "overall"
    assert report["std"] == "sample (ddof=1)"


def test_markdown_figures_and_stdout(
    run_root: Path, report: dict[str, Any], capsys: pytest.CaptureFixture
) -> None:
    text = (run_root / "report" / "results.md").read_text()
    table = text.split("\n\n")[1]
    for name in ("Vanilla", "LfF", "DiffInject", "GCE bias (reference)"):
        assert f"| {name} |" in table
    assert "| DiffInject | 2 | 68.00 ± 2.83 |" in table  # (0.66, 0.70): sample std 2.83 points
    assert "overall ★" in table and "conflicting ★" not in table
    for figure in (
        "accuracy.png",
        "samples.png",
    ):  # what they show: test_accuracy_plot_*, test_report_samples
        with Image.open(run_root / "report" / figure) as image:
            assert image.format == "PNG"
    assert "seeds)" not in table and FEWER_NOTE not in text  # every value present in every seed
    assert "worst-group" not in table.splitlines()[0]  # no group sizes recorded: not shown
    main([str(run_root), "--seeds", "0", "1"])  # the CLI prints the same table (probe now cached)
    assert "| DiffInject | 2 | 68.00 ± 2.83 |" in capsys.readouterr().out


def table_rows(text: str) -> dict[str, list[str]]:
    """The compact table of results.md: method name → its cells after the name."""
    rows = {}
    for line in text.split("\n\n")[1].splitlines()[2:]:
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def expected_cell(values: list[float], seeds: int | None = None) -> str:
    """How the table shows these per-seed fractions: mean (± sample std) in %, (k of n seeds) if fewer."""
    text = f"{100 * sum(values) / len(values):.2f}"
    if len(values) > 1:
        text += f" ± {100 * sample_std(values):.2f}"
    return f"{text} ({len(values)} of {seeds} seeds)" if seeds is not None and len(values) < seeds else text


def plotted(results: dict[str, Any]) -> tuple[Any, list[BarContainer], list[ErrorbarContainer]]:
    fig = accuracy_plot(results)
    assert fig is not None
    (ax,) = fig.axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    errors = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    return ax, bars, errors


def test_accuracy_plot_bars_are_the_table_means(run_root: Path, report: dict[str, Any]) -> None:
    """One bar per compared method in every column's group; heights = the table's means, error bars = stds."""
    ax, bars, errors = plotted(report)
    present = [
        (stage, name) for stage, name in METHODS if stage in COMPARED and report["methods"][stage]["n"]
    ]
    assert [stage for stage, _ in present] == ["vanilla", "lff", "debias"]  # not the bias reference
    assert [b.get_label() for b in bars] == [f"{name} (n=2)" for _, name in present]
    table = table_rows((run_root / "report" / "results.md").read_text())
    for (stage, name), bar, error in zip(present, bars, errors, strict=True):
        assert len(bar.patches) == len(COLUMNS)
        for column, rect in enumerate(bar.patches):
            assert abs(rect.get_x() + rect.get_width() / 2 - column) < 0.4  # inside the column's group
            values = [METRICS[stage][seed][column] for seed in (0, 1)]
            assert rect.get_height() == pytest.approx(100 * sum(values) / 2)
            assert table[name][1 + column] == expected_cell(values)
            assert float(table[name][1 + column].split()[0]) == pytest.approx(rect.get_height(), abs=0.005)
        (segments,) = [c.get_segments() for c in error.lines[2]]
        for column, segment in enumerate(segments):
            spread = [METRICS[stage][seed][column] for seed in (0, 1)]
            assert (segment[1][1] - segment[0][1]) / 2 == pytest.approx(100 * sample_std(spread))
    assert not ax.texts  # no bar is averaged over fewer seeds


def write_metrics(root: Path, seed: int, stage: str, values: tuple[Any, ...], **extra: Any) -> None:
    """`root/seed{seed}/{stage}/metrics.json` with (overall, aligned, conflicting, worst-group, val acc)."""
    path = root / f"seed{seed}" / stage / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**metrics_payload(stage, values, seed), **extra}))  # NaN stays NaN


def test_last_epoch_rows(tmp_path: Path) -> None:
    """`{stage}/last_epoch/metrics.json` (the last checkpoint's test): its own row beside the best one."""
    root = tmp_path / "cmnist" / "1pct"
    best = {0: (0.40, 0.99, 0.33, 0.00, 0.97), 1: (0.44, 1.00, 0.38, 0.10, 0.98)}
    last = {0: (0.50, 0.95, 0.45, 0.20, 0.90), 1: (0.56, 0.93, 0.52, 0.30, 0.88)}
    for seed in (0, 1):
        write_metrics(root, seed, "vanilla", best[seed])
        write_metrics(root, seed, "vanilla/last_epoch", last[seed])
        write_metrics(root, seed, "debias", best[seed])
        write_metrics(root, seed, "lff", best[seed])
    write_metrics(root, 0, "debias/last_epoch", last[0])  # seed 1's last-epoch test is missing
    result = write_report(root, seeds=[0, 1])
    methods = result["methods"]
    assert [k for k in methods if k.endswith("/last_epoch")] == ["vanilla/last_epoch", "debias/last_epoch"]
    vanilla_last, debias_last = methods["vanilla/last_epoch"], methods["debias/last_epoch"]
    assert vanilla_last["name"] == "Vanilla, last epoch" and vanilla_last["n"] == 2
    assert vanilla_last["test/acc"]["mean"] == pytest.approx(0.53)
    assert methods["vanilla"]["test/acc"]["mean"] == pytest.approx(0.42)  # the best row is not mixed in
    assert debias_last["n"] == 1 and debias_last["seeds"] == [0] and debias_last["missing_seeds"] == [1]
    text = (root / "report" / "results.md").read_text()
    table = table_rows(text)
    columns = range(len(COLUMNS))
    seeds_cells = {"Vanilla, last epoch": "2", "DiffInject, last epoch": "1 of 2 (seed 1 not run)"}
    for name, per_seed in (("Vanilla, last epoch", last), ("DiffInject, last epoch", {0: last[0]})):
        cells = [seeds_cells[name]] + [expected_cell([v[c] for v in per_seed.values()]) for c in columns]
        cells += [expected_cell([v[4] for v in per_seed.values()]), "last epoch"]
        assert table[name] == cells, name
    assert table["Vanilla"][-1] == "val/acc" and table["Vanilla"][1] == expected_cell([0.40, 0.44])
    assert "LfF, last epoch" not in table and "GCE bias (reference), last epoch" not in table
    assert "| DiffInject, last epoch | [0] | [1] |" in text  # the detail table names the missing seed
    _, bars, _ = plotted(result)  # the figure compares the selected checkpoints only
    assert [b.get_label() for b in bars] == ["Vanilla (n=2)", "LfF (n=2)", "DiffInject (n=2)"]
    assert not any("last epoch" in note for note in result["notes"])


def test_a_value_missing_in_one_seed_is_counted_per_cell(tmp_path: Path) -> None:
    """A mean over fewer seeds than the row's "seeds" cell says is marked "(k of n seeds)" in the table and
    n=k in the figure."""
    root = tmp_path / "cmnist" / "1pct"
    values = {
        0: (0.40, 0.99, 0.33, 0.05, 0.97),
        1: (0.44, 1.00, 0.38, None, 0.98),
        2: (0.48, 0.98, 0.42, math.nan, None),
    }
    for seed, per_seed in values.items():
        write_metrics(root, seed, "vanilla", per_seed)
    result = write_report(root)
    entry = result["methods"]["vanilla"]
    assert entry["n"] == 3 and entry["test/acc"]["n"] == 3
    worst = entry["test/acc_conflicting_worst_class"]
    assert worst["n"] == 1 and worst["mean"] == 0.05
    assert entry["val/acc"]["n"] == 2 and entry["val/acc"]["mean"] == pytest.approx(0.975)
    text = (root / "report" / "results.md").read_text()
    row = table_rows(text)["Vanilla"]
    overall = [values[s][0] for s in (0, 1, 2)]
    assert row[:2] == ["3", expected_cell(overall, seeds=3)] and "seeds)" not in row[1]
    assert row[4] == "5.00 (1 of 3 seeds)"
    assert row[5] == expected_cell([0.97, 0.98], seeds=3) == "97.50 ± 0.71 (2 of 3 seeds)"
    assert FEWER_NOTE in text
    holes = "worst class (conflicting) (2 of 3 seeds), val acc (1 of 3 seeds)"
    assert f"| Vanilla | [0, 1, 2] | – | {holes} |" in text
    saved = json.loads((root / "report" / "results.json").read_text())["methods"]["vanilla"]
    assert saved["test/acc_conflicting_worst_class"]["values"] == [0.05, None, None]  # NaN written as null
    ax, bars, _ = plotted(result)
    assert [b.patches[3].get_height() for b in bars] == [pytest.approx(5.0)]
    assert [t.get_text() for t in ax.texts] == ["n=1"]  # only the worst-class bar is marked
    assert ax.texts[0].get_position()[0] == pytest.approx(
        bars[0].patches[3].get_x() + bars[0].patches[3].get_width() / 2
    )


def test_synthetic_measurements_match_construction(report: dict[str, Any]) -> None:
    synthetic = report["synthetic"]
    seed0, seed1 = synthetic["per_seed"]["0"], synthetic["per_seed"]["1"]
    assert seed0["size"] == 12 and seed1["size"] == 10
    assert seed0["colour"]["conflict_rate"] == pytest.approx(8 / 12)
    assert seed1["colour"]["conflict_rate"] == pytest.approx(6 / 10)
    assert seed0["colour"]["colour_is_style_colour"] == pytest.approx(8 / 12)
    assert seed0["colour"]["colour_is_content_colour"] == pytest.approx(4 / 12)  # contents are aligned
    assert seed0["colour"]["off_palette"] == 0.0
    summary = synthetic["summary"]["colour.conflict_rate"]
    assert summary["mean"] == pytest.approx((8 / 12 + 6 / 10) / 2)
    assert summary["std"] == pytest.approx(sample_std([8 / 12, 6 / 10]))
    # The digit is the content's: the probe reads the label, not the style's label.
    assert seed0["shape"]["shape_is_label"] >= 0.9
    assert seed0["shape"]["shape_is_style_label"] <= 0.1
    # content digit + style colour: the 8 of 12 whose style colour differs from the content's, read as such
    recombination = seed0["recombination"]
    assert recombination["content_shape_style_colour"] == pytest.approx(8 / 12, abs=1.5 / 12)
    assert recombination["recombination"] == recombination["content_shape_style_colour"]
    assert recombination["style_shape_content_colour"] <= 1 / 12
    assert synthetic["probe"]["test_acc"] >= 0.85
    # Nominal rate (style colour ≠ label) claims every sample conflicts; the images say 8 of 12.
    assert seed0["nominal"]["nominal_conflict_rate"] == 1.0
    assert seed0["nominal"]["content_is_conflicting"] == 0.0
    assert seed0["distinct_contents"] == 12 and seed0["effective_contents"] == pytest.approx(12.0)
    pixels = seed0["pixels"]  # same strokes as the content, another colour: mostly closer to the content
    assert pixels["closer_to_content"] >= 0.75 and pixels["mse_to_content"] < pixels["mse_to_style"]


def test_timings_and_configs(report: dict[str, Any]) -> None:
    timings = report["timings"]
    assert timings["per_stage"]["vanilla"]["total_s"] == 22.0
    assert timings["per_stage"]["inject"]["per_seed"] == {"seed0": 30.0, "seed1": 31.0}
    assert timings["total_s"] == pytest.approx(sum(TIMINGS.values()))
    knobs = report["configs"]["knobs"]
    assert knobs["inject"]["gamma"] == 0.7 and knobs["inject"]["label_from"] == "content"
    assert knobs["inject"]["k_source"] == "per_class" and "differs_across_seeds" not in knobs["inject"]
    diffusion = {
        "class": "P2DiffusionModule",
        "unet_preset": "cmnist-small",
        "max_steps": 2500,
        "p2_gamma": 1.0,
    }
    assert knobs["diffusion"] == diffusion
    assert knobs["debias"]["class"] == "DebiasClassifier" and knobs["debias"]["loss"] == "ce"
    assert len(report["configs"]["files"]) == 2 * 5 + 1


def test_colour_estimator_recovers_bias_on_real_train_images() -> None:
    """Real CMNIST training images (5% conflicting, default colour noise): the known bias label comes back."""
    module = CMNISTDataModule(source="embedded", ratio=0.05)
    module.setup("fit")
    train = module.train_eval_dataset
    estimated = synthetic_set.estimate_colour_classes(train.images.numpy())
    accuracy = float((estimated == train.biases).mean())
    conflicting = train.labels != train.biases
    assert accuracy >= 0.98, accuracy
    assert float((estimated[conflicting] == train.biases[conflicting]).mean()) >= 0.98
    noisy = np.clip(
        train.images.numpy() / 255.0 + np.random.default_rng(0).normal(0, 0.05, (3600, 3, 28, 28)), 0, 1
    )
    assert (
        float((synthetic_set.estimate_colour_classes(noisy) == train.biases).mean()) >= 0.98
    )  # noisy background
    stats = synthetic_set.colour_stats(estimated, train.labels)
    assert stats["conflict_rate"] == pytest.approx(conflicting.mean(), abs=0.02)


def test_colour_stats_known_answer() -> None:
    labels = np.array([0, 1, 2, 3, 4])
    estimated = np.array([0, 5, 2, -1, 7])  # one without foreground, two conflicting out of four
    stats = synthetic_set.colour_stats(
        estimated, labels, content_bias=np.array([0, 5, 2, 3, 9]), style_bias=-np.ones(5)
    )
    assert stats["conflict_rate"] == 0.5 and stats["num_without_foreground"] == 1
    assert stats["colour_is_content_colour"] == 0.75 and stats["colour_is_style_colour"] is None
    black = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    assert synthetic_set.estimate_colour_classes(black).tolist() == [-1]


def test_recombination_stats_known_answer() -> None:
    shape, colour = np.array([1, 1, 2, 3]), np.array([5, 1, 6, 3])
    content_label, style_label = np.array([1, 1, 2, 9]), np.array([5, 7, 6, 3])
    content_bias, style_bias = np.array([1, 1, 2, 3]), np.array([5, 7, 6, 4])
    args = (shape, colour, content_label, style_label, content_bias, style_bias)
    forward = synthetic_set.recombination_stats(*args, "content")
    assert forward["content_shape_style_colour"] == 0.5 and forward["recombination"] == 0.5
    assert (
        forward["style_shape_content_colour"] == 0.25
    )  # sample 3: the style's digit in the content's colour
    assert synthetic_set.recombination_stats(*args, "style")["recombination"] == 0.25
    assert (
        synthetic_set.recombination_stats(shape, colour, None, style_label, None, None, "content")[
            "recombination"
        ]
        is None
    )


def test_diversity_and_nominal() -> None:
    stats = synthetic_set.diversity_stats(np.array([1, 1, 2, 2]), np.array([5, 6, 7, 8]))
    assert stats["distinct_contents"] == 2 and stats["effective_contents"] == pytest.approx(2.0)
    assert stats["effective_styles"] == pytest.approx(4.0)
    assert synthetic_set.effective_number(np.array([1, 1, 1, 2])) < 2.0
    nominal = synthetic_set.nominal_stats(
        np.array([0, 1]), np.array([0, 1]), np.array([3, 1]), np.array([0, 4]), "style"
    )
    assert nominal["assumed_bias_carrier"] == "content" and nominal["nominal_conflict_rate"] == 0.5


def test_missing_stages_have_no_row(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    for seed in (0, 1, 2):
        folder = root / f"seed{seed}" / "vanilla"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(
            json.dumps(metrics_payload("vanilla", METRICS["vanilla"][0], seed))
        )
    result = write_report(root)
    assert result["seeds"] == [0, 1, 2] and result["methods"]["debias"]["n"] == 0
    text = (root / "report" / "results.md").read_text()
    assert "| DiffInject |" not in text and "| LfF |" not in text and "| Vanilla | 3 |" in text
    line = "Not run, so not in the table: LfF, DisEnt, LfF+BE, DisEnt+BE, A², A² without the consistency "
    line += "term (control), AmpliBias, top-K oversampling (control), GCE bias (reference) "
    assert line + "(`make baselines` adds them); DiffInject (`make pipeline` adds it)." in text
    assert "samples.png not written" in text and not (root / "report" / "samples.png").exists()
    assert (root / "report" / "accuracy.png").is_file() and result["synthetic"] is None


def test_bffhq_marks_the_conflicting_column(tmp_path: Path) -> None:
    root = tmp_path / "bffhq" / "0.5pct"
    folder = root / "seed0" / "vanilla"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics_payload("vanilla", METRICS["vanilla"][0], 0)))
    write_yaml(folder / "pipeline_config.yaml", {"data": {"class_path": "BFFHQDataModule", "init_args": {}}})
    result = write_report(root)
    assert result["unbiased_column"] == "conflicting"
    assert "conflicting ★" in (root / "report" / "results.md").read_text()


def test_malformed_inputs_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    bad = root / "seed0" / "lff" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"test": {"test/acc": "high"}}))  # a seed's metrics.json: left out, warned
    with pytest.warns(UserWarning, match=f"{bad}: unexpected content .*test/acc must be a number"):
        write_report(root)
    bad.unlink()
    topk = root / "seed0" / "bias" / "topk_summary.json"  # other inputs still stop the report
    topk.parent.mkdir(parents=True)
    topk.write_bytes(b'{"k": "\xff"}')
    with pytest.raises(ValueError, match=f"{topk} is not UTF-8"):
        write_report(root)
    topk.unlink()
    manifest = root / "seed0" / "inject" / "manifest.csv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("index,label,path\n0,1,images/0.png\n")
    with pytest.raises(ValueError, match=f"{manifest}: missing column"):
        write_report(root)
    manifest.write_text("index,content_index,style_index,label,path\n0,x,2,1,images/0.png\n")
    with pytest.raises(ValueError, match="line 2: column 'content_index'"):
        write_report(root)
    manifest.write_text("index,content_index,style_index,label,path\n0,1,2,1,images/0.png\n")
    with pytest.raises(ValueError, match="cannot read synthetic image .*0.png"):
        write_report(root)


def test_data_that_does_not_match_the_manifest_is_not_measured(run_root: Path, tmp_path: Path) -> None:
    """Labels recorded in the manifest disagree with the rebuilt data: a note, no colour/shape numbers."""
    root = tmp_path / "cmnist" / "1pct"
    inject = root / "seed0" / "inject"
    inject.mkdir(parents=True)
    source = run_root / "seed0" / "inject"
    (inject / "images").symlink_to(source / "images")
    (inject / "pipeline_config.yaml").write_text((source / "pipeline_config.yaml").read_text())
    lines = (source / "manifest.csv").read_text().splitlines()
    fields = lines[1].split(",")
    fields[4] = str((int(fields[4]) + 1) % 10)  # content_label no longer matches the data
    (inject / "manifest.csv").write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    result = write_report(root)
    seed0 = result["synthetic"]["per_seed"][0]
    assert "colour" not in seed0 and "shape" not in seed0 and seed0["size"] == 12
    assert any("1 content label(s) differ" in note for note in result["synthetic"]["notes"])


def test_timing_keys_and_knobs() -> None:
    timings = collect_timings(
        Path("."), [0], {"seed0/bias/fit": 5.0, "seed0/bias/topk": 2.0, "seed1/bias": 9.0}
    )
    assert timings["per_stage"] == {"bias": {"total_s": 7.0, "per_seed": {"seed0": 7.0}}}
    model = {"class_path": "diffinject.stages.DebiasClassifier", "init_args": {"loss": "gce", "extra": 3}}
    config = {
        "model": model,
        "data": {"init_args": {"synthetic_manifest": "runs/x/manifest.csv", "ratio": 0.1}},
    }
    assert knobs_of("debias", config) == {"class": "DebiasClassifier", "loss": "gce", "extra": 3}


def test_json_safe_drops_nan_and_zero_bars_stay() -> None:
    assert json_safe({"a": [math.nan, 1.0], 2: (math.inf, "x")}) == {"a": [None, 1.0], "2": [None, "x"]}
    assert percent_of({"mean": 0.0}, "mean", math.nan) == 0.0 and math.isnan(
        percent_of(None, "mean", math.nan)
    )


def test_selection_rule_per_method_comes_from_the_stage_hparams(tmp_path: Path) -> None:
    for seed, hparams in ((0, {"selection_bias": "bias/checkpoints/best.ckpt"}), (1, {})):
        payload = {**metrics_payload("LfFClassifier", (0.5, 0.9, 0.4, 0.0, 0.8), seed), "hparams": hparams}
        path = tmp_path / f"seed{seed}" / "lff" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(payload))
    assert collect_method(tmp_path, "lff", [0])["selection"] == "val/acc_pseudo_balanced"
    assert collect_method(tmp_path, "lff", [1])["selection"] == "val/acc"
    # seeds selected differently are shown as such, not averaged silently under one name
    assert collect_method(tmp_path, "lff", [0, 1])["selection"] == "val/acc / val/acc_pseudo_balanced"
