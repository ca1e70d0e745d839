"""A²'s generator and discriminator: a small style-based GAN (StyleGAN2-lite), in model space [-1, 1].

A² trains an unconditional style-based generator on the whole biased training set, adapts a copy to the
top-K with the cross-domain consistency loss (which needs the generator's intermediate feature maps), and
inverts images into its W space (which needs `mean_w` as a start). Kept from StyleGAN2: the mapping MLP
z → w, a learned 4×4 constant, modulated/demodulated 3×3 convolutions (two per resolution), toRGB skip
connections and a residual discriminator with a minibatch-stddev channel. Configured away (research
note, "A² may configure away"): equalised learning rate, noise inputs, path-length regularisation and the
FIR up/down-sampling filters (bilinear / average pooling instead). Style mixing and W+ inversion remain
possible: `synthesis` takes one w per layer (B×num_ws×w_dim) as well as one per image (B×w_dim).
Without equalised LR, StyleGAN2's 0.01 learning-rate multiplier of the mapping network is best mirrored by
giving `generator.mapping` its own, lower learning rate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffinject.nets.gan import check_model_size, feature_widths

_LRELU_GAIN = math.sqrt(2.0)  # keeps unit variance through leaky ReLU(0.2), as in StyleGAN


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2) * _LRELU_GAIN


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


class MappingNetwork(nn.Module):
    """z → w: normalise z to unit RMS, then `layers` × (Linear → leaky ReLU)."""

    def __init__(self, z_dim: int, w_dim: int, layers: int) -> None:
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, z: Tensor) -> Tensor:
        x = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)
        for layer in self.layers:
            x = _lrelu(layer(x))
        return x


class ModulatedConv(nn.Module):
    """A convolution whose input channels are scaled per sample by a style from w (StyleGAN2).

    Demodulation rescales each output channel to unit expected variance, which replaces AdaIN's explicit
    normalisation. Computed as scale → shared conv → rescale (not a grouped conv): the same result, and a
    plain convolution is the fast path on CPU.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        w_dim: int,
        kernel: int = 3,
        demodulate: bool = True,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel) / math.sqrt(in_ch * kernel**2))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.style = nn.Linear(w_dim, in_ch)
        nn.init.ones_(self.style.bias)  # styles start near 1: the layer starts as a plain convolution
        self.demodulate = demodulate
        self.upsample = upsample

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        style = self.style(w)
        if self.upsample:
            x = _upsample(x)
        x = F.conv2d(x * style[:, :, None, None], self.weight, padding=self.weight.shape[-1] // 2)
        if self.demodulate:
            energy = style.pow(2) @ self.weight.pow(2).sum(dim=(2, 3)).t()  # B×out: Σ_in,k (w·s)²
            x = x * torch.rsqrt(energy + 1e-8)[:, :, None, None]
        return x + self.bias[None, :, None, None]


class StyleGenerator(nn.Module):
    """Unconditional style-based generator: z (B×z_dim) → images (B×channels×S×S in [-1, 1]).

    Layers, lowest resolution first: a 3×3 modulated conv on the learned 4×4 constant, then per doubling an
    upsampling modulated conv and a second one; each resolution's toRGB (1×1, not demodulated) adds to the
    upsampled RGB of the one below, and tanh bounds the sum. Conv k reads w[:, k]; the toRGB after conv k
    reads w[:, k + 1] (StyleGAN2's layout), so `num_ws` = number of convs + 1.
    """

    def __init__(
        self,
        model_size: int = 32,
        channels: int = 3,
        z_dim: int = 128,
        w_dim: int = 128,
        mapping_layers: int = 4,
        width: int = 16,
        max_width: int = 64,
    ) -> None:
        super().__init__()
        self.model_size = check_model_size(model_size)
        self.channels, self.z_dim, self.w_dim = channels, z_dim, w_dim
        widths = feature_widths(self.model_size, width, max_width)
        self.mapping = MappingNetwork(z_dim, w_dim, mapping_layers)
        self.const = nn.Parameter(torch.randn(1, widths[4], 4, 4))
        self.convs = nn.ModuleList([ModulatedConv(widths[4], widths[4], w_dim)])
        self.to_rgbs = nn.ModuleList([ModulatedConv(widths[4], channels, w_dim, kernel=1, demodulate=False)])
        for res in sorted(widths)[1:]:
            self.convs.append(ModulatedConv(widths[res // 2], widths[res], w_dim, upsample=True))
            self.convs.append(ModulatedConv(widths[res], widths[res], w_dim))
            self.to_rgbs.append(ModulatedConv(widths[res], channels, w_dim, kernel=1, demodulate=False))

    @property
    def num_ws(self) -> int:
        """How many w vectors one image uses (the W+ depth)."""
        return len(self.convs) + 1

    @property
    def num_features(self) -> int:
        """How many feature maps `synthesis(..., return_features=True)` returns (one per conv)."""
        return len(self.convs)

    def forward(self, z: Tensor) -> Tensor:
        """z (B×z_dim) → images B×channels×S×S in [-1, 1]."""
        return self.synthesis(self.mapping(z))

    def synthesis(self, w: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """w → images; with `return_features`, also every conv's activated output, lowest resolution first.

        `w` is B×w_dim (one style for every layer) or B×num_ws×w_dim (W+: per-layer styles, for mixing
        or W+ inversion). The feature list has `num_features` maps (4×4 first, then two per resolution),
        the maps the cross-domain consistency loss compares between source and adapted generator.
        """
        ws = self._broadcast(w)
        x = self.const.expand(ws.shape[0], -1, -1, -1)
        features: list[Tensor] = []
        rgb: Tensor | None = None
        per_resolution = [self.convs[:1]] + [self.convs[i : i + 2] for i in range(1, len(self.convs), 2)]
        index = 0
        for convs, to_rgb in zip(per_resolution, self.to_rgbs, strict=True):
            for conv in convs:
                x = _lrelu(conv(x, ws[:, index]))
                features.append(x)
                index += 1
            new_rgb = to_rgb(x, ws[:, index])
            rgb = new_rgb if rgb is None else new_rgb + _upsample(rgb)
        images = torch.tanh(rgb)
        return (images, features) if return_features else images

    @torch.no_grad()
    def mean_w(self, n: int = 4096, generator: torch.Generator | None = None) -> Tensor:
        """The mean w over `n` random z (1×w_dim): StyleGAN's start point for inverting an image into W."""
        device = self.const.device
        z = torch.randn(n, self.z_dim, generator=generator, device=device)
        return self.mapping(z).mean(dim=0, keepdim=True)

    def _broadcast(self, w: Tensor) -> Tensor:
        if w.ndim == 2 and w.shape[1] == self.w_dim:
            return w[:, None, :].expand(-1, self.num_ws, -1)
        if w.ndim == 3 and w.shape[1:] == (self.num_ws, self.w_dim):
            return w
        raise ValueError(
            f"synthesis expects w of shape B×{self.w_dim} or B×{self.num_ws}×{self.w_dim}, "
            f"got {tuple(w.shape)}"
        )


class _DiscriminatorBlock(nn.Module):
    """Two 3×3 convs, 2× average pool, plus a pooled 1×1 shortcut, summed / √2 (StyleGAN2's 'resnet' D)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, in_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        main = F.avg_pool2d(_lrelu(self.conv2(_lrelu(self.conv1(x)))), 2)
        return (main + self.skip(F.avg_pool2d(x, 2))) / math.sqrt(2.0)


class StyleDiscriminator(nn.Module):
    """Residual discriminator: images (B×channels×S×S, [-1, 1]) → one real/fake logit per image (B).

    fromRGB (1×1) at S, residual blocks halving down to 4×4, a minibatch standard-deviation channel (how
    varied the group of images is, against mode collapse; `mbstd_group=0` turns it off), a 3×3 conv and
    two linear layers. Used for both the source GAN and the adaptation.
    """

    def __init__(
        self,
        model_size: int = 32,
        channels: int = 3,
        width: int = 16,
        max_width: int = 64,
        mbstd_group: int = 4,
    ) -> None:
        super().__init__()
        self.model_size = check_model_size(model_size)
        widths = feature_widths(self.model_size, width, max_width)
        self.from_rgb = nn.Conv2d(channels, widths[self.model_size], 1)
        self.blocks = nn.Sequential(
            *(_DiscriminatorBlock(widths[res], widths[res // 2]) for res in sorted(widths, reverse=True)[:-1])
        )
        self.mbstd_group = mbstd_group
        top = widths[4]
        self.conv = nn.Conv2d(top + (1 if mbstd_group > 0 else 0), top, 3, padding=1)
        self.fc = nn.Linear(top * 16, top)
        self.out = nn.Linear(top, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.model_size, self.model_size):
            raise ValueError(f"discriminator expects {self.model_size}-px images, got {tuple(x.shape)}")
        h = self.blocks(_lrelu(self.from_rgb(x)))
        if self.mbstd_group > 0:
            h = torch.cat([h, self._minibatch_std(h)], dim=1)
        h = _lrelu(self.conv(h))
        return self.out(_lrelu(self.fc(h.flatten(1)))).squeeze(1)

    def _minibatch_std(self, h: Tensor) -> Tensor:
        """One channel per image: the feature std across its group, averaged (groups of `mbstd_group`)."""
        batch = h.shape[0]
        group = min(self.mbstd_group, batch)
        if batch % group:
            group = 1  # a batch the group size does not divide: no cross-image statistic (std 0)
        stats = h.view(group, batch // group, *h.shape[1:])
        std = (stats.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / group)
        return std.repeat(group)[:, None, None, None].expand(-1, 1, *h.shape[2:])
