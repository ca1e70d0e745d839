"""The label-free injection check: pure functions on hand-built tensors, the callback on a tiny inject run,
and its paths in the pipeline's per-seed layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from diffinject.callbacks import InjectionCheck
from diffinject.callbacks.gate import gate_folder, premise_verdict
from diffinject.callbacks.injection_check import CHECK_FILENAME
from diffinject.cli import main
from diffinject.data import CMNISTDataModule
from diffinject.diffusion import to_model_space
from diffinject.measures.injection_check import (
    bias_kept_content,
    bias_moved,
    content_retention,
    content_scores,
    gate_samples,
    injection_check,
    paired_accuracy,
    second_view_transfer,
)
from diffinject.nets import build_classifier
from diffinject.workflow.configs import Options, stage_config
from inject_helpers import tiny_unet, train_tiny_unet, write_topk, write_unet_export

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


class MeanChannelNet(nn.Module):
    """Stub bias model: class = floor(10 × mean of channel 0), one-hot logits."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0].mean(dim=(1, 2)) * 10).floor().clamp(0, 9).long()
        return F.one_hot(cls, 10).float() + 0 * self.anchor


def _images(classes: list[int], seed: int = 0) -> torch.Tensor:
    """Channel 0 constant at the middle of the class's bin, the other channels random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(classes), 3, 28, 28, generator=g)
    x[:, 0] = (torch.tensor(classes, dtype=torch.float32) / 10 + 0.05).view(-1, 1, 1)
    return x


def test_bias_moved_and_kept_content_rates() -> None:
    net = MeanChannelNet()
    content = _images([1, 2, 3, 4, 5], seed=1)
    style = _images([6, 7, 8, 9, 5], seed=2)
    synthetic = _images([6, 2, 0, 9, 5], seed=3)  # moved, kept, neither, moved, both (content = style class)
    moved = bias_moved(net, synthetic, style)
    kept = bias_kept_content(net, synthetic, content)
    assert moved.tolist() == [True, False, False, True, True]
    assert kept.tolist() == [False, True, False, False, True]
    result = injection_check(net, tiny_unet(16), synthetic, content, style, model_size=16)
    assert result["n"] == 5
    assert result["bias_moved"] == pytest.approx(3 / 5) and result["bias_kept_content"] == pytest.approx(
        2 / 5
    )
    assert result["bias_pairs_differ"] == pytest.approx(4 / 5)
    assert result["bias_moved_when_differ"] == pytest.approx(2 / 4)
    assert result["bias_kept_content_when_differ"] == pytest.approx(1 / 4)


def test_content_scores_on_stub_features() -> None:
    g = torch.Generator().manual_seed(0)
    h_content, h_style = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    for normalise in (True, False):
        same = content_scores(h_content, h_content, h_style, normalise)
        assert same["retained"].all() and torch.allclose(same["cos_content"], torch.ones(6))
        other = content_scores(h_style, h_content, h_style, normalise)
        assert not other["retained"].any() and torch.allclose(other["cos_style"], torch.ones(6))
    # per-channel statistics do not count after instance normalisation (AdaIN's "style"), they do raw
    scale, shift = torch.rand(1, 4, 1, 1, generator=g) + 0.5, torch.randn(1, 4, 1, 1, generator=g)
    restyled = content_scores(h_content * scale + shift, h_content, h_style)
    assert torch.allclose(restyled["cos_content"], torch.ones(6), atol=1e-4)
    assert not torch.allclose(
        content_scores(h_content + 3.0, h_content, h_style, False)["cos_content"], torch.ones(6)
    )


def test_content_retention_with_a_tiny_unet() -> None:
    unet = tiny_unet(16)
    content, style = _images([1] * 4, seed=4), _images([2] * 4, seed=5)
    assert content_retention(unet, content, content, style, model_size=16)["retained"].all()
    assert not content_retention(unet, style, content, style, model_size=16, t=200)["retained"].any()
    result = injection_check(MeanChannelNet(), unet, content, content, style, model_size=16)
    assert result["content_retention"] == 1.0 and result["content_retention_raw"] == 1.0
    assert result["cos_content"] == pytest.approx(1.0, abs=1e-5) and result["cos_style"] < 1.0
    assert result["bias_kept_content"] == 1.0 and result["bias_moved"] == 0.0
    assert result["moved_and_retained"] == 0.0
    swapped = injection_check(MeanChannelNet(), unet, style, content, style, model_size=16)
    assert swapped["content_retention"] == 0.0 and swapped["bias_moved"] == 1.0


# ------------------------------------------------------------------------------------------ tiny inject run
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("check")
    data = CMNISTDataModule(root=str(root / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    digits = torch.stack([train[i]["image"] for i in range(8)])
    torch.set_num_threads(1)
    unet = train_tiny_unet(to_model_space(digits, 16), steps=40)  # the check needs no good UNet
    write_unet_export(unet, root / "runs/cmnist/1pct/diffusion/unet", image_size=28)
    bias = root / "runs/cmnist/1pct/bias"
    (bias / "checkpoints").mkdir(parents=True)
    write_topk(bias / "topk.csv", train.labels, train.biases, k=2)
    torch.manual_seed(0)
    net = build_classifier("mlp", 10, 3, 28)
    hparams = {"arch": "mlp", "num_classes": 10, "in_channels": 3, "image_size": 28}
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, bias / "checkpoints/best.ckpt")
    return root


def _config(
    root: Path, out: str, bias_checkpoint: str, max_samples: int = 512, gate: dict | None = None
) -> Path:
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
                },
                {
                    "class_path": "diffinject.callbacks.InjectionCheck",
                    "init_args": {
                        "bias_checkpoint": bias_checkpoint,
                        "output_dir": str(run),
                        "max_samples": max_samples,
                        **(gate or {}),
                    },
                },
            ],
        },
        "model": {
            "class_path": "InjectionPredictModule",
            "init_args": {"unet": str(root / "runs/cmnist/1pct/diffusion/unet"), "steps": 10},
        },
        "data": {
            "class_path": "InjectionPairsDataModule",
            "init_args": {
                "data": {
                    "class_path": "CMNISTDataModule",
                    "init_args": {"root": str(root / "data"), "source": "embedded", "ratio": 0.01},
                },
                "topk": str(root / "runs/cmnist/1pct/bias/topk.csv"),
                "ratio": 0.005,
                "k": 2,
                "batch_size": 9,
            },
        },
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _scalar_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    return set(accumulator.Tags()["scalars"])


def _hand_bias_rates(workdir: Path, run: Path, bias_checkpoint: str, n: int) -> tuple[float, float]:
    """bias_moved / bias_kept_content recomputed here: the bias model's class of each of the first `n`
    synthetic images (by sample index) against its style's and its content's."""
    import csv

    import numpy as np
    from PIL import Image

    from diffinject.data import CMNISTDataModule
    from diffinject.stages.weights import load_classifier_checkpoint

    net, _ = load_classifier_checkpoint(bias_checkpoint, {"num_classes": 10})
    net.eval()
    with (run / "manifest.csv").open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["index"]))[:n]
    data = CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset

    def classes(images: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return net(torch.stack(images)).argmax(1)

    synthetic = [
        torch.from_numpy(
            np.asarray(Image.open(run / row["path"]).convert("RGB"), dtype=np.float32) / 255
        ).permute(2, 0, 1)
        for row in rows
    ]
    style = [train[int(row["style_index"])]["image"] for row in rows]
    content = [train[int(row["content_index"])]["image"] for row in rows]
    mine = classes(synthetic)
    return (mine == classes(style)).float().mean().item(), (mine == classes(content)).float().mean().item()


def test_callback_writes_check_and_recomputes_on_rerun(workdir: Path) -> None:
    bias = str(workdir / "runs/cmnist/1pct/bias/checkpoints/best.ckpt")
    cfg = _config(workdir, "inject", bias, max_samples=12)
    run = workdir / "runs/cmnist/1pct/inject"
    cli = main(["predict", "--config", str(cfg)])
    check = json.loads((run / CHECK_FILENAME).read_text())
    assert check["n"] == 12 and check["num_rows"] == len(cli.datamodule.plan) == 18 and check["complete"]
    moved, kept = _hand_bias_rates(workdir, run, bias, 12)
    assert check["bias_moved"] == pytest.approx(moved) and check["bias_kept_content"] == pytest.approx(kept)
    for key in ("content_retention", "moved_and_retained"):
        assert check[key] * 12 == pytest.approx(round(check[key] * 12)), key  # a count out of 12 samples
    lower = check["bias_moved"] + check["content_retention"] - 1
    assert lower - 1e-9 <= check["moved_and_retained"] <= min(check["bias_moved"], check["content_retention"])
    assert check["bias_checkpoint"] == bias
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, InjectionCheck))
    assert callback.result == check
    assert {"check/bias_moved", "check/content_retention", "check/moved_and_retained"} <= _scalar_tags(run)

    # a rerun with nothing left to generate recomputes the (deterministic) check from the files on disk
    (run / CHECK_FILENAME).unlink()
    main(["predict", "--config", str(cfg)])
    assert json.loads((run / CHECK_FILENAME).read_text()) == check


def test_missing_bias_checkpoint_is_named_before_any_image(workdir: Path) -> None:
    missing = str(workdir / "runs/cmnist/1pct/seed7/bias/checkpoints/best.ckpt")
    cfg = _config(workdir, "inject_missing", missing)
    with pytest.raises(
        FileNotFoundError, match=r"bias checkpoint .*seed7/bias/checkpoints/best.ckpt not found"
    ):
        main(["predict", "--config", str(cfg)])
    assert not list((workdir / "runs/cmnist/1pct/inject_missing").glob("images/*.png"))


# ------------------------------------------------------------------------------------------ pipeline paths
@pytest.mark.parametrize("dataset", ["cmnist", "ccifar10", "bffhq", "dogscats"])
@pytest.mark.parametrize("profile", ["quick", "smoke"])
def test_pipeline_moves_the_check_to_the_seed_folders(tmp_path: Path, dataset: str, profile: str) -> None:
    opts = Options(dataset=dataset, runs=str(tmp_path), profile=profile, configs=str(REPO / "configs"))
    config = stage_config(opts, "inject", seed=2)
    entries = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("InjectionCheck")]
    assert len(entries) == 1
    args = entries[0]["init_args"]
    seed_folder = Path(config["data"]["init_args"]["topk"]).parents[1]
    assert seed_folder == opts.root / "seed2"
    assert args["bias_checkpoint"] == str(seed_folder / "bias/checkpoints/best.ckpt")
    assert args["output_dir"] == config["trainer"]["default_root_dir"] == str(seed_folder / "inject")
    assert args["gate"] is True
    assert args["second_view_checkpoint"] == str(seed_folder / "vanilla/checkpoints/best.ckpt")
    debias = stage_config(opts, "debias", seed=2)
    assert debias["data"]["init_args"]["synthetic_manifest"] == str(
        seed_folder / "inject/manifest_accepted.csv"
    )


# ------------------------------------------------------------------------------------------------ the gate
def test_gate_samples_needs_a_confident_move() -> None:
    p = torch.tensor([0.95, 0.9, 0.4, 0.5])
    assert gate_samples(p, 0.5).tolist() == [True, True, False, True]
    assert gate_samples(p, 0.9).tolist() == [True, True, False, False]


def test_second_view_transfer_counts_only_informative_moves() -> None:
    content = torch.tensor([1, 1, 1, 1, 2, 3])
    style = torch.tensor([5, 5, 5, 1, 6, 7])  # sample 3: the second view cannot tell content and style apart
    synthetic = torch.tensor([5, 1, 9, 1, 6, 3])
    moved = torch.tensor([True, True, True, True, True, False])  # sample 5: the bias model saw no move
    result = second_view_transfer(synthetic, content, style, moved)
    assert result["n"] == 4  # samples 0, 1, 2, 4
    assert result["follows_style"] == pytest.approx(2 / 4) and result["follows_content"] == pytest.approx(
        1 / 4
    )
    assert second_view_transfer(synthetic, content, style, torch.zeros(6, dtype=torch.bool))["n"] == 0


def _read_csv(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("min_z", [-100.0, 100.0])
def test_callback_gate_writes_the_accepted_manifest_and_obeys_the_premise(
    workdir: Path, min_z: float
) -> None:
    """The gate's per-sample verdicts in gate.csv agree with manifest_accepted.csv; a premise threshold no
    second view can reach (1.0, with an untrained 'Vanilla' model) rejects the whole set and says why."""
    bias = str(workdir / "runs/cmnist/1pct/bias/checkpoints/best.ckpt")
    out = f"inject_gate{int(min_z > 0)}"
    gate = {
        "gate": True,
        "gate_min_confidence": 0.5,  # accepted ⇒ the bias model's argmax is the style's class
        "second_view_checkpoint": bias,  # any classifier checkpoint serves as the second view here
        "premise_z": min_z,
    }
    main(["predict", "--config", str(_config(workdir, out, bias, gate=gate))])
    run = workdir / f"runs/cmnist/1pct/{out}"
    check = json.loads((run / CHECK_FILENAME).read_text())
    judged = _read_csv(run / "gate.csv")
    accepted = _read_csv(run / "manifest_accepted.csv")
    manifest = {row["index"]: row for row in _read_csv(run / "manifest.csv")}
    assert len(judged) == len(manifest) == check["gate"]["num_rows"] == 18
    kept = [row["index"] for row in judged if row["accepted"] == "1"]
    assert [row["index"] for row in accepted] == kept and check["gate"]["accepted"] == len(kept)
    assert all(accepted_row == manifest[accepted_row["index"]] for accepted_row in accepted)
    premise = check["gate"]["premise"]
    if premise["n"] == 0:  # nothing informative: no verdict, the per-sample gate alone decides
        assert premise["holds"] is None
    else:  # the second view is the bias model itself: it follows every move it sees
        assert premise["second_view_follows_style"] == 1.0 and premise["second_view_follows_content"] == 0.0
        assert premise["holds"] is (min_z < 0)  # z is large but finite: 100 standard errors are out of reach
        if min_z > 0:
            assert kept == [] and "premise failed" in check["gate"]["verdict"]
        # the validation signal was computed (gate on, a second view): a model against itself never disagrees
        validation = premise["validation"]
        assert validation["n"] > 0 and validation["bias_only"] == validation["view_only"] == 0
        assert validation["z"] == 0.0 and validation["bias_acc"] == validation["view_acc"]
    if min_z < 0 and not check["gate"]["content_lost"]:  # no premise bar: the per-image test alone decides
        assert kept == [row["index"] for row in judged if float(row["p_style_class"]) >= 0.5]
    if check["gate"]["content_lost"]:  # the verdict names the first reason: the premise, then the content
        assert kept == [] and ("content lost" in check["gate"]["verdict"] or premise["holds"] is False)


def _judged(p: list[float], retained: list[bool], view: list[tuple[int, int, int]]) -> dict:
    syn, con, sty = (torch.tensor([v[i] for v in view]) for i in range(3))
    probs = torch.tensor(p)
    return {
        "p_style_class": probs,
        "moved": probs >= 0.5,
        "retained": torch.tensor(retained),
        "view_synthetic": syn,
        "view_content": con,
        "view_style": sty,
    }


def test_gate_folder_rejects_the_set_when_the_second_view_ignores_the_edit(tmp_path: Path) -> None:
    rows = [{"index": str(i), "path": f"images/{i}.png", "label": "0"} for i in range(4)]
    p, retained = [0.9, 0.8, 0.2, 0.9], [True, True, True, False]
    # the ERM model keeps reading the content on every moved image: the premise fails
    ignores = _judged(p, retained, [(1, 1, 2), (3, 3, 4), (5, 5, 6), (7, 7, 8)])
    result = gate_folder(tmp_path, rows, ignores, True, 0.5, 2.0)
    assert result["premise"]["holds"] is False and result["premise"]["second_view_follows_style"] == 0.0
    assert result["accepted"] == 0 and "premise failed" in result["verdict"]
    assert _read_csv(tmp_path / "manifest_accepted.csv") == []
    assert [r["accepted"] for r in _read_csv(tmp_path / "gate.csv")] == ["0"] * 4
    # it follows the edit: the per-sample gate decides (a confident move); 3 of 4 keep their content
    follows = _judged(p, retained, [(2, 1, 2), (4, 3, 4), (5, 5, 6), (8, 7, 8)])
    result = gate_folder(tmp_path, rows, follows, True, 0.5, 2.0)
    assert result["premise"]["holds"] is True and result["accepted"] == 3
    assert [r["index"] for r in _read_csv(tmp_path / "manifest_accepted.csv")] == ["0", "1", "3"]
    assert result["rejected_not_moved"] == 1 and result["content_retention"] == 0.75
    # a set that mostly lost its contents is rejected whole, and says why
    lost = _judged(p, [True, False, False, False], [(2, 1, 2), (4, 3, 4), (5, 5, 6), (8, 7, 8)])
    result = gate_folder(tmp_path, rows, lost, True, 0.5, 2.0, min_retention=0.5)
    assert result["content_lost"] and result["accepted"] == 0 and "content lost" in result["verdict"]
    # gate off: everything is used, the premise is still reported
    result = gate_folder(tmp_path, rows, ignores, False, 0.5, 2.0)
    assert result["accepted"] == 4 and result["premise"]["holds"] is False


def test_paired_accuracy_is_mcnemar_over_the_discordant_images() -> None:
    bias = torch.tensor([1, 1, 1, 1, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    view = torch.tensor([1, 0, 0, 0, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    result = paired_accuracy(bias, view)  # bias alone right on 3, the view alone on 1
    assert result["bias_only"] == 3 and result["view_only"] == 1 and result["n"] == 10
    assert result["bias_acc"] == 0.7 and result["view_acc"] == 0.5
    assert result["z"] == pytest.approx((3 - 1) / 4**0.5)
    assert paired_accuracy(view, bias)["z"] == pytest.approx(-1.0)
    assert paired_accuracy(bias, bias)["z"] == 0.0  # never disagree: no evidence either way
    with pytest.raises(ValueError, match="shapes differ"):
        paired_accuracy(bias, view[:3])


@pytest.mark.parametrize(
    ("transfer_z", "val_z", "premise_val_z", "expected"),
    [
        (4.0, -3.0, 1.0, (True, "edits")),  # ERM clearly follows the edits: enough on its own
        (2.2, 1.5, 1.0, (True, "validation")),  # CMNIST 5 %-like: weaker transfer, bias model wins on val
        (2.8, -1.5, 1.0, (False, None)),  # texture-like: weaker transfer, bias model loses on val
        (2.2, 1.0, 1.0, (False, None)),  # one standard error is not more than one (a single image's worth)
        (2.2, 0.0, 0.0, (False, None)),  # a tie on validation is no evidence, whatever the threshold
        (-0.5, 3.0, 1.0, (False, None)),  # ERM keeps the content: validation cannot rescue that
        (2.2, 1.5, None, (False, None)),  # the validation signal turned off: the edits alone decide
        (2.2, None, 1.0, (False, None)),  # not computed
        (None, 1.5, 1.0, (None, None)),  # no informative edit: no verdict
    ],
)
def test_premise_verdict_takes_either_signal(transfer_z, val_z, premise_val_z, expected) -> None:
    validation = None if val_z is None else {"z": val_z}
    assert premise_verdict(transfer_z, 3.5, validation, premise_val_z) == expected


def test_gate_folder_accepts_on_validation_evidence_and_says_why_it_fails(tmp_path: Path) -> None:
    rows = [{"index": str(i), "path": f"images/{i}.png", "label": "0"} for i in range(6)]
    p, retained = [0.9] * 6, [True] * 6
    # ERM follows 3 of the 5 informative moves and keeps the content on 2: z = 1/sqrt(...) < 3.5
    weak = _judged(p, retained, [(2, 1, 2), (4, 3, 4), (6, 5, 6), (7, 7, 8), (9, 9, 10), (0, 0, 0)])
    wins = {"n": 400, "bias_acc": 0.97, "view_acc": 0.96, "bias_only": 6, "view_only": 2, "z": 1.41}
    loses = {"n": 400, "bias_acc": 0.88, "view_acc": 0.90, "bias_only": 9, "view_only": 16, "z": -1.4}
    held = gate_folder(tmp_path, rows, weak, True, 0.5, 3.5, validation=wins)
    assert held["premise"]["holds"] is True and held["premise"]["evidence"] == "validation"
    assert held["accepted"] == 6 and held["premise"]["validation"] == wins
    failed = gate_folder(tmp_path, rows, weak, True, 0.5, 3.5, validation=loses)
    assert failed["premise"]["holds"] is False and failed["accepted"] == 0
    assert "validation split (88.0% against 90.0%, z = -1.4)" in failed["verdict"]
    off = gate_folder(tmp_path, rows, weak, True, 0.5, 3.5, validation=wins, premise_val_z=None)
    assert off["premise"]["holds"] is False and off["premise"]["min_val_z"] is None


def test_gate_off_accepts_everything_but_still_judges(workdir: Path) -> None:
    bias = str(workdir / "runs/cmnist/1pct/bias/checkpoints/best.ckpt")
    main(["predict", "--config", str(_config(workdir, "inject_nogate", bias))])
    run = workdir / "runs/cmnist/1pct/inject_nogate"
    check = json.loads((run / CHECK_FILENAME).read_text())
    assert check["gate"]["enabled"] is False and check["gate"]["accepted"] == 18
    assert len(_read_csv(run / "manifest_accepted.csv")) == 18 and check["gate"]["premise"]["holds"] is None


def test_gate_thresholds_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gate_min_confidence"):
        InjectionCheck(bias_checkpoint="b.ckpt", output_dir=str(tmp_path), gate_min_confidence=1.5)
