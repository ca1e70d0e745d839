"""Classifier networks, the GCE loss and the classifier stages on a tiny in-memory biased data module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from diffinject.nets import build_classifier
from diffinject.stages import BiasClassifier, DebiasClassifier, VanillaClassifier
from diffinject.stages.classifiers import check_data_compatibility
from diffinject.stages.losses import gce_loss
from diffinject.stages.weights import load_classifier_checkpoint

ARGS = {"arch": "mlp", "num_classes": 3, "in_channels": 3, "image_size": 6}


class DictDataset(Dataset):
    """Items `{"image", "label", "bias", "index"}` from tensors, as the project's datasets yield them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, biases: torch.Tensor) -> None:
        self.images, self.labels, self.biases = images, labels, biases

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "label": int(self.labels[i]),
            "bias": int(self.biases[i]),
            "index": i,
        }


def colored_split(
    n: int, conflict_ratio: float, seed: int, num_classes: int = 3, size: int = 6
) -> DictDataset:
    """Label = a faint spatial pattern; bias = a strong colour, the label's unless conflicting."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    conflicting = torch.rand(n, generator=gen) < conflict_ratio
    biases = torch.where(conflicting, (labels + 1) % num_classes, labels)
    images = 0.05 * torch.rand(n, 3, size, size, generator=gen)
    for i in range(n):
        images[i, :, int(labels[i]) * 2, :] += 0.3  # the shape cue
        images[i, int(biases[i]) % 3] += 0.6  # the colour cue
    return DictDataset(images.clamp(0, 1), labels, biases)


class TinyBiasedDataModule(LightningDataModule):
    """Stand-in for a BiasedDataModule: 3 classes, 3×6×6 images, colour bias; no files, no workers."""

    name, pct, num_classes, image_size, channels = "tiny", "10pct", 3, 6, 3

    def __init__(
        self, n_train: int = 60, batch_size: int = 16, ratio: float = 0.1, n_synthetic: int = 0
    ) -> None:
        super().__init__()
        self.n_train, self.batch_size, self.ratio, self.n_synthetic = n_train, batch_size, ratio, n_synthetic

    def setup(self, stage: str | None = None) -> None:
        self.train_eval_dataset = colored_split(self.n_train, self.ratio, seed=1)
        self.num_train_original = self.n_train
        self.train_dataset = self.train_eval_dataset
        if self.n_synthetic:
            extra = colored_split(self.n_synthetic, 0.5, seed=4)
            self.train_dataset = DictDataset(
                torch.cat([self.train_eval_dataset.images, extra.images]),
                torch.cat([self.train_eval_dataset.labels, extra.labels]),
                torch.cat([self.train_eval_dataset.biases, torch.full((self.n_synthetic,), -1)]),
            )
        self.val_dataset = colored_split(30, self.ratio, seed=2)
        self.test_dataset = colored_split(30, 2 / 3, seed=3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.train_eval_dataset, batch_size=self.batch_size)


def tiny_trainer(root: Path, **kwargs: object) -> Trainer:
    options = {
        "default_root_dir": str(root),
        "max_epochs": 2,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return Trainer(**{**options, **kwargs})


# -- networks -------------------------------------------------------------------------------------------
def test_mlp_is_lff_3x100_and_takes_unit_images() -> None:
    net = build_classifier("mlp", 10, 3, 28)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2352, 100),
        (100, 100),
        (100, 100),
        (100, 10),
    ]
    assert net(torch.rand(4, 3, 28, 28)).shape == (4, 10)


def test_resnet18_any_channels_and_sizes() -> None:
    net = build_classifier("resnet18", 2, 1, 32)
    assert net(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    assert build_classifier("resnet18", 5, 3, 16)(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_classifier_builder_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown classifier arch 'vit'"):
        build_classifier("vit", 10, 3, 28)
    with pytest.raises(ValueError, match="no pretrained"):
        build_classifier("mlp", 10, 3, 28, pretrained=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_classifier("resnet18", 10, 3, 32, pretrained=True)


def test_pretrained_resnet_loads_from_local_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = build_classifier("resnet18", 4, 3, 32, pretrained=True)
    assert torch.equal(net[1].conv1.weight, reference.conv1.weight)
    assert net[1].fc.out_features == 4


# -- GCE ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [0.7, 0.3])
def test_gce_gradient_is_p_pow_q_times_ce_gradient(q: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 1])
    for i in range(5):  # per sample: d GCE_i = p_i^q · d CE_i
        (g_gce,) = torch.autograd.grad(gce_loss(logits, target, q)[i], logits)
        (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="none")[i], logits)
        p = torch.softmax(logits, 1)[i, target[i]].detach()
        assert torch.allclose(g_gce, p**q * g_ce)
        # and it is the gradient of the textbook GCE (1 - p^q) / q
        (g_ref,) = torch.autograd.grad((1 - torch.softmax(logits, 1)[i, target[i]] ** q) / q, logits)
        assert torch.allclose(g_gce, g_ref)


def test_gce_value_and_reductions() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    ce = F.cross_entropy(logits, target, reduction="none")
    expected = ce * torch.exp(-ce) ** 0.7
    assert torch.allclose(gce_loss(logits, target), expected)
    assert torch.allclose(gce_loss(logits, target, reduction="mean"), expected.mean())
    assert torch.allclose(gce_loss(logits, target, reduction="sum"), expected.sum())
    with pytest.raises(ValueError, match="reduction"):
        gce_loss(logits, target, reduction="max")
    with pytest.raises(ValueError, match="q must be"):
        gce_loss(logits, target, q=0.0)


# -- stages -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["BiasClassifier", "LfFClassifier", "DisEntClassifier", "DebiasClassifier"])
@pytest.mark.parametrize("q", [0.0, -0.5, 1.5])
def test_gce_q_outside_its_range_fails_at_construction(stage: str, q: float) -> None:
    """Not at the first training step, after data loading and the bias model: at the config check."""
    import diffinject.stages as stages

    with pytest.raises(ValueError, match=r"GCE q must be in \(0, 1\]"):
        getattr(stages, stage)(**ARGS, q=q)


def test_model_data_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"model.image_size=6 but data.image_size=28"):
        check_data_compatibility(ARGS, type("D", (), {"num_classes": 3, "channels": 3, "image_size": 28})())


def test_vanilla_fit_checkpoints_and_test_writes_metrics(tmp_path: Path) -> None:
    data = TinyBiasedDataModule()
    model = VanillaClassifier(**ARGS, lr=1e-2)
    trainer = tiny_trainer(tmp_path)
    trainer.fit(model, datamodule=data)
    best = tmp_path / "checkpoints" / "best.ckpt"
    assert best.is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(best, weights_only=True)  # primitives only: loads without unpickling classes
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["diffinject"]["val"]["epoch"]) == (1, 1)  # really the last epoch
    assert checkpoint["diffinject"]["val"]["val/acc"] == pytest.approx(
        float(trainer.checkpoint_callback.best_model_score)
    )

    tester = tiny_trainer(tmp_path)
    tester.test(VanillaClassifier(**ARGS), datamodule=data, ckpt_path=str(best))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["stage"] == "VanillaClassifier"
    assert set(metrics["test"]) >= {
        "test/acc",
        "test/acc_aligned",
        "test/acc_conflicting",
        "test/acc_worst_group",
    }
    assert metrics["val"]["val/acc"] == checkpoint["diffinject"]["val"]["val/acc"]
    assert metrics["checkpoint"] == str(best)
    # overall accuracy agrees with the aligned/conflicting split of the test set
    test = metrics["test"]
    biases, labels = data.test_dataset.biases, data.test_dataset.labels
    n_aligned = int((biases == labels).sum())
    expected = (test["test/acc_aligned"] * n_aligned + test["test/acc_conflicting"] * (30 - n_aligned)) / 30
    assert test["test/acc"] == pytest.approx(expected)


def test_mismatched_config_fails_in_setup(tmp_path: Path) -> None:
    model = VanillaClassifier(arch="mlp", num_classes=10, in_channels=3, image_size=6)
    with pytest.raises(ValueError, match="model.num_classes=10 but data.num_classes=3"):
        tiny_trainer(tmp_path).fit(model, datamodule=TinyBiasedDataModule())


def test_bias_classifier_gce_learns_the_colour_and_predicts_ce(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=90)
    trainer = tiny_trainer(tmp_path, max_epochs=6)
    trainer.fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    scorer = BiasClassifier(**ARGS, weights=str(tmp_path / "checkpoints" / "best.ckpt"))
    outputs = tiny_trainer(tmp_path).predict(scorer, datamodule=data)
    index = torch.cat([o["index"] for o in outputs])
    loss = torch.cat([o["loss"] for o in outputs])
    assert torch.equal(index, torch.arange(90))
    conflicting = data.train_eval_dataset.biases != data.train_eval_dataset.labels
    # a colour-biased f_B finds the conflicting items harder than the aligned ones
    assert loss[conflicting].mean() > 2 * loss[~conflicting].mean()


def test_bias_predict_without_weights_or_missing_weights_fails(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs trained weights"):
        tiny_trainer(tmp_path).predict(BiasClassifier(**ARGS), datamodule=TinyBiasedDataModule())
    missing = BiasClassifier(**ARGS, weights=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="run the bias fit stage first"):
        tiny_trainer(tmp_path).predict(missing, datamodule=TinyBiasedDataModule())


def test_bias_weights_with_other_arch_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mlp.ckpt"
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(BiasClassifier(**ARGS), datamodule=TinyBiasedDataModule())
    trainer.save_checkpoint(path)
    other = BiasClassifier(**{**ARGS, "arch": "resnet18"}, weights=str(path))
    with pytest.raises(ValueError, match="trained with arch=mlp"):
        other.load_weights(str(path))


def test_debias_counts_synthetic_items_and_requires_them(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_synthetic=12)
    model = DebiasClassifier(**ARGS, loss="gce")
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert (model.num_original, model.num_synthetic) == (60, 12)
    assert 0 < float(trainer.callback_metrics["train/synthetic_frac"]) < 1
    with pytest.raises(ValueError, match="no synthetic items"):
        tiny_trainer(tmp_path).fit(DebiasClassifier(**ARGS), datamodule=TinyBiasedDataModule())
    with pytest.raises(ValueError, match="'ce' or 'gce'"):
        DebiasClassifier(**ARGS, loss="focal")


def test_selection_with_the_bias_model_monitors_pseudo_balanced_accuracy(tmp_path: Path) -> None:
    data = TinyBiasedDataModule()
    bias_dir = tmp_path / "bias"
    tiny_trainer(bias_dir, max_epochs=2).fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    bias_ckpt = str(bias_dir / "checkpoints" / "best.ckpt")

    # selection_min_group=0: this 30-image split has too few pseudo-conflicting images for the default
    # minimum (the fallback to the last epoch is tested in test_selection_rule.py)
    model = VanillaClassifier(**ARGS, lr=1e-2, selection_bias=bias_ckpt, selection_min_group=0)
    assert model.monitor == "val/acc_pseudo_balanced" and VanillaClassifier(**ARGS).monitor == "val/acc"
    trainer = tiny_trainer(tmp_path / "vanilla", max_epochs=3)
    trainer.fit(model, datamodule=data)
    assert trainer.checkpoint_callback.monitor == "val/acc_pseudo_balanced"
    best = torch.load(tmp_path / "vanilla" / "checkpoints" / "best.ckpt", weights_only=True)
    saved = best["diffinject"]["val"]
    best_score = float(trainer.checkpoint_callback.best_model_score)
    assert saved["val/acc_pseudo_balanced"] == pytest.approx(best_score)
    assert all(key.startswith("net.") for key in best["state_dict"])  # the bias model is not saved along

    # the score is the mean accuracy over "bias model right / wrong" on the validation split, each image
    # weighted by the bias model's confidence: w = 1 - p_B(label) for "wrong", 1 - w for "right"
    bias_net = load_classifier_checkpoint(bias_ckpt, {})[0].eval()
    selected = VanillaClassifier(**ARGS)
    selected.load_state_dict(best["state_dict"])
    images, labels = data.val_dataset.images, data.val_dataset.labels
    with torch.no_grad():
        right = (selected.eval()(images).argmax(1) == labels).double()
        wrong = 1 - bias_net(images).double().softmax(1)[torch.arange(len(labels)), labels]
    groups = [(w * right).sum() / w.sum() for w in (1 - wrong, wrong)]
    assert saved["val/acc_pseudo_balanced"] == pytest.approx(float(sum(groups) / 2))
    assert saved["val/pseudo_conflicting_size"] == pytest.approx(float(wrong.sum()))

    missing = VanillaClassifier(**ARGS, selection_bias=str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="nope.ckpt not found"):
        tiny_trainer(tmp_path / "missing").fit(missing, datamodule=data)
