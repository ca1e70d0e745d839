"""Classifier networks: the LfF MLP for Colored MNIST, a torchvision ResNet-18 for the rest, and DisEnt's
two-encoder network built from the same parts.

Every network takes images in [0, 1] (the data modules never normalise); any normalisation lives inside the
network, so checkpoints, top-K scoring and the debiased classifier all see the same preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ARCHS = ("mlp", "resnet18")

# DisEnt/BiasEnsemble normalise every ResNet input with the CIFAR-10 statistics (research §6); ImageNet
# statistics go with ImageNet weights.
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """Per-channel (x - mean) / std as a module, so it travels with the weights."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLPClassifier(nn.Sequential):
    """LfF's Colored-MNIST MLP: flatten → [Linear → ReLU] × len(hidden) → Linear (default 3 × 100).

    Inputs are used as given in [0, 1]. (The DisEnt/A² MLPs divide by 255 a second time; we do not, see
    the evidence notes in the classifiers report.)
    """

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (100, 100, 100)) -> None:
        layers = mlp_layers(in_features, hidden)
        layers.append(nn.Linear(hidden[-1] if hidden else in_features, num_classes))
        super().__init__(*layers)


def mlp_layers(in_features: int, hidden: tuple[int, ...]) -> list[nn.Module]:
    """flatten → [Linear → ReLU] per hidden width (the feature part of every CMNIST MLP)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    return layers


def _imagenet_resnet18_state_dict() -> dict[str, torch.Tensor]:
    """Load torchvision's ImageNet ResNet-18 weights from the local torch hub cache only (no download)."""
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained=True needs the ImageNet ResNet-18 weights at {path}, and nothing is downloaded at "
            f"run time. Copy the file from {url} there (or set TORCH_HOME), or use pretrained: false."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def build_resnet18(num_classes: int, in_channels: int = 3, pretrained: bool = False) -> nn.Sequential:
    """torchvision ResNet-18 (ImageNet stem, as DisEnt/BE/DiffInject use even at 32×32), fc → num_classes."""
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    if pretrained:
        if in_channels != 3:
            raise ValueError(f"pretrained ResNet-18 expects in_channels=3, got {in_channels}")
        net.load_state_dict(_imagenet_resnet18_state_dict())
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if pretrained else (CIFAR_MEAN, CIFAR_STD)
    if in_channels != 3:
        mean, std = (0.5,) * in_channels, (0.25,) * in_channels
    return nn.Sequential(Normalize(mean, std), net)


def build_classifier(
    arch: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool = False
) -> nn.Module:
    """Build the classifier named by `arch` ("mlp" | "resnet18") for [0, 1] images of C × S × S."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1 or image_size < 1:
        raise ValueError(f"in_channels and image_size must be positive, got {in_channels}, {image_size}")
    if arch == "mlp":
        if pretrained:
            raise ValueError("arch='mlp' has no pretrained weights; set pretrained: false")
        return MLPClassifier(in_channels * image_size * image_size, num_classes)
    if arch == "resnet18":
        return build_resnet18(num_classes, in_channels, pretrained)
    raise ValueError(f"unknown classifier arch {arch!r}; expected one of {ARCHS}")


#: DisEnt's CMNIST encoder widths (`MLP_DISENTANGLE`: 2352 → 100 → 100 → 16, ReLU after each, research §6)
DISENT_MLP_HIDDEN = (100, 100, 16)


def build_encoder(
    arch: str, in_channels: int, image_size: int, pretrained: bool = False
) -> tuple[nn.Module, int]:
    """A feature extractor and its output width: the DisEnt MLP (16-d) or ResNet-18 without fc (512-d).

    DisEnt's ResNet reads z from a hook on `avgpool`; dropping `fc` gives the same 512-d vector directly.
    """
    if arch == "mlp":
        if pretrained:
            raise ValueError("arch='mlp' has no pretrained weights; set pretrained: false")
        return nn.Sequential(*mlp_layers(in_channels * image_size * image_size, DISENT_MLP_HIDDEN)), 16
    if arch == "resnet18":
        net = build_resnet18(1, in_channels, pretrained)
        net[1].fc = nn.Identity()
        return net, 512
    raise ValueError(f"unknown classifier arch {arch!r}; expected one of {ARCHS}")


class DisEntNet(nn.Module):
    """DisEnt (Lee et al. 2021): intrinsic and bias encoders whose features z = [z_i, z_b] feed two linear
    heads, C_i (the debiased classifier, 32 → C for the MLP, 1024 → C for ResNet-18) and C_b (the bias head).

    `forward` is the intrinsic prediction C_i([z_i, z_b]) the stage evaluates, as DisEnt's `evaluate_ours`.
    """

    def __init__(
        self, arch: str, num_classes: int, in_channels: int, image_size: int, pretrained: bool = False
    ) -> None:
        super().__init__()
        self.encoder_i, width = build_encoder(arch, in_channels, image_size, pretrained)
        self.encoder_b, _ = build_encoder(arch, in_channels, image_size, pretrained)
        self.head_i = nn.Linear(2 * width, num_classes)
        self.head_b = nn.Linear(2 * width, num_classes)

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_i, z_b), each N × width."""
        return self.encoder_i(images), self.encoder_b(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head_i(torch.cat(self.features(images), dim=1))

    def bias_logits(self, images: torch.Tensor) -> torch.Tensor:
        """C_b([z_i, z_b]): the bias head's prediction (monitoring only)."""
        return self.head_b(torch.cat(self.features(images), dim=1))
