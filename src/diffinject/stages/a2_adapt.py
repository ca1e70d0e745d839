"""A² step 2 (issue 22): per seed, the source generator adapted to that seed's pooled top-K images.

Ojha et al.'s few-shot adaptation (CVPR 2021), which A² runs on the extracted samples: the target generator
starts as a copy of the source, a frozen copy of the source stays beside it, and each iteration adds to the
adversarial loss `consistency_weight` × the cross-domain distance-consistency KL (`gan_losses.
distance_consistency_loss`) between the two generators' feature maps for `consistency_batch` shared
latents, at one random layer per anchor (never the 4×4 one), as CDC draws. The term keeps the pairwise
structure of the source's outputs, so a translated image stays on its content; `consistency_weight: 0` is
the "A² without the consistency term" control, and then the term is not computed at all.

Our choices, each a config value: the mapping network stays frozen (`train_mapping: false`), so the source
and the adapted generator share one W space and an image inverted into the source's W can be rendered by
the adapted one (CDC trains it at 0.01 × lr, nearly frozen); the discriminator starts from the source
export's (`init_discriminator: source`, as CDC loads both from the source checkpoint; `fresh` re-initialises
it); CDC's anchor-region sampling and patch discriminator are configured away (the patch branch never fires
at 32 px, research note §1.3). The images come from `data.topk_images.TopKImagesDataModule` (as AmpliBias's):
every row of the seed's `topk.csv` (all classes pooled, one generator per seed), drawn with replacement,
labels unused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from diffinject.nets.gan_style import StyleDiscriminator, StyleGenerator
from diffinject.stages.a2_source import StyleGANStage, check_gan_settings
from diffinject.stages.gan_export import GAN_INFO, fit_hint, load_gan_export
from diffinject.stages.gan_losses import distance_consistency_loss, parse_policy, random_anchor_layers


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Class labels of a training split (its `labels` array, else read item by item)."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.array([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)  # type: ignore[arg-type]


class A2Adaptation(StyleGANStage):
    """The target generator of A²: the source export adapted to the seed's top-K with the CDC term.

    Args:
        source: the source stage's export folder (`a2_source/generator`).
        image_size, channels: the data's (checked against the data module and the export).
        consistency_weight: weight of the distance-consistency KL (CDC's `kl_wt`: 1000; 0: off, the control).
        consistency_batch: shared latents per iteration for that term (CDC: 4; at least 3).
        train_mapping: also train the mapping network (off: source and target share W, module docstring).
        init_discriminator: "source" (the export's D) or "fresh".
        lr, betas, r1_gamma, r1_every, ema_decay, ema_warmup, diff_augment, sample_every_n_steps,
            num_samples, sample_seed, export_dir: as `A2SourceGAN`.
    """

    stage_name = "a2_adapt"

    def __init__(
        self,
        source: str,
        image_size: int = 32,
        channels: int = 3,
        consistency_weight: float = 1000.0,
        consistency_batch: int = 4,
        train_mapping: bool = False,
        init_discriminator: str = "source",
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.0, 0.99),
        r1_gamma: float = 10.0,
        r1_every: int = 16,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        diff_augment: str | None = None,
        sample_every_n_steps: int = 50,
        num_samples: int = 16,
        sample_seed: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_gan_settings(lr, betas, r1_gamma, r1_every, ema_decay, sample_every_n_steps, num_samples)
        if consistency_weight < 0:
            raise ValueError(
                f"consistency_weight must be >= 0 (0: the control without it), got {consistency_weight}"
            )
        if consistency_batch < 3:
            raise ValueError(
                f"consistency_batch must be >= 3 (softmax over the others), got {consistency_batch}"
            )
        if init_discriminator not in ("source", "fresh"):
            raise ValueError(f"init_discriminator must be 'source' or 'fresh', got {init_discriminator!r}")
        if diff_augment:
            parse_policy(diff_augment)
        loaded = load_gan_export(
            source,
            StyleGenerator,
            hint=fit_hint(source, "a2_source"),
            stages=("a2_source",),
            expect={"channels": channels},
            discriminator_class=StyleDiscriminator if init_discriminator == "source" else None,
        )
        self.source_info = loaded.info
        self.source_sha256 = loaded.generator_sha256
        self.generator_args = dict(loaded.info["generator_args"])
        #: the fixed reference of the consistency term; never trained (no optimiser holds it)
        # train mode only silences Lightning's eval-module warning: the network has no dropout or batch norm
        self.source_generator = loaded.generator.train()
        self.generator = copy.deepcopy(loaded.generator).train().requires_grad_(True)
        if not train_mapping:
            self.generator.mapping.requires_grad_(False)
        if loaded.discriminator is not None:
            self.discriminator = loaded.discriminator
            self.discriminator_args = dict(loaded.info["discriminator_args"])
        else:
            args = loaded.info.get("discriminator_args") or {}
            self.discriminator_args = {
                "model_size": self.generator.model_size, "channels": channels,
                "width": int(args.get("width", self.generator_args["width"])),
                "max_width": int(args.get("max_width", self.generator_args["max_width"])),
                "mbstd_group": int(args.get("mbstd_group", 4)),
            }  # fmt: skip
            self.discriminator = StyleDiscriminator(**self.discriminator_args)
        self.discriminator.train().requires_grad_(True)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        #: how often the consistency term was computed (tests: none with weight 0)
        self.consistency_evaluations = 0

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_size = getattr(datamodule, "image_size", None)
        trained = self.source_info.get("image_size")
        if data_size is not None and trained is not None and int(data_size) != int(trained):
            raise ValueError(
                f"{Path(self.hparams.source) / GAN_INFO}: the source generator was trained on "
                f"{trained}-px images, but the data module serves {data_size} px"
            )

    def extra_generator_loss(self) -> dict[str, Tensor]:
        weight = float(self.hparams.consistency_weight)
        if weight == 0.0:
            return {}
        self.consistency_evaluations += 1
        n = int(self.hparams.consistency_batch)
        z = torch.randn(n, self.generator.z_dim, device=self.device)
        with torch.no_grad():
            w = self.source_generator.mapping(z)
            _, source_feats = self.source_generator.synthesis(w, return_features=True)
        target_w = self.generator.mapping(z) if self.hparams.train_mapping else w
        _, target_feats = self.generator.synthesis(target_w, return_features=True)
        layers = random_anchor_layers(self.generator.num_features, n)
        return {"consistency": weight * distance_consistency_loss(source_feats, target_feats, layers)}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        params = [p for p in self.generator.parameters() if p.requires_grad]
        opt_g = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        return [opt_g, opt_d]

    def export_info(self) -> dict[str, object]:
        info = super().export_info()
        datamodule = getattr(self.trainer, "datamodule", None)
        topk = getattr(datamodule, "topk_path", None)
        pool = getattr(datamodule, "pool", None)
        info["source"] = {
            "path": str(self.hparams.source),
            "generator_sha256": self.source_sha256,
            "global_step": self.source_info.get("global_step"),
        }
        info["topk"] = None if topk is None else str(topk)
        info["topk_images"] = None if pool is None else len(pool.indices)
        info["consistency_weight"] = float(self.hparams.consistency_weight)
        info["train_mapping"] = bool(self.hparams.train_mapping)
        return info
