"""AmpliBias's generator and discriminator: FastGAN-lite (Liu et al., ICLR 2021) at small sizes.

AmpliBias trains a GAN from scratch on the top-K images only (≈10 per class), which FastGAN makes
workable with two stabilisers, both kept here:
- **skip-layer excitation** (SLE) in the generator: a low-resolution feature map gates the channels of
  a high-resolution one (a cheap long skip path that carries global, style-like information);
- a **self-supervised discriminator**: besides its real/fake logits, small decoders reconstruct each real
  image from the discriminator's own features, so the discriminator must keep describing the image and
  cannot overfit ten images by memorising a few cues.
Scaled down for the CPU (research note, "AmpliBias may configure away"): one output image at `model_size`
(FastGAN also emits a 128-px copy), `width`-based channel counts instead of ngf=64, no noise injection, no
SLE inside the discriminator, and the reconstruction is compared with MSE/L1 by the caller (no LPIPS:
no pretrained weights here). Kept: spectral norm on every conv, BatchNorm + GLU blocks, the alternating
simple / two-conv upsampling blocks, the residual downsampling blocks and the 5×5 patch logits.
All images are model space: B×C×S×S in [-1, 1] (`nets.gan`'s module docstring says how data maps there).
BatchNorm makes `eval()` matter: sample with the generator in eval mode (running statistics).
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from diffinject.nets.gan import check_model_size, feature_widths, quarter_crop


def _conv(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, sn: bool = True
) -> nn.Module:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
    return spectral_norm(conv) if sn else conv


class SkipLayerExcitation(nn.Module):
    """Gate a high-resolution map's channels by a low-resolution one: high · σ(f(pool₄(low))).

    f = 4×4 conv (4×4 → 1×1) → swish → 1×1 conv; the gate is per sample and per channel, so what the
    coarse layers decide (colour, layout) reaches the fine layers without passing through every block.
    """

    def __init__(self, low_ch: int, high_ch: int, sn: bool = True) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(4),
            _conv(low_ch, high_ch, 4, sn=sn),
            nn.SiLU(),
            _conv(high_ch, high_ch, 1, sn=sn),
            nn.Sigmoid(),
        )

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        return high * self.gate(low)


def _up_block(in_ch: int, out_ch: int, two_convs: bool, sn: bool = True) -> nn.Sequential:
    """Nearest 2× upsampling, then (3×3 conv → BatchNorm → GLU) once or twice (FastGAN's UpBlock / -Comp)."""
    layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")]
    for conv_in in [in_ch, out_ch] if two_convs else [in_ch]:
        layers += [_conv(conv_in, out_ch * 2, 3, padding=1, sn=sn), nn.BatchNorm2d(out_ch * 2), nn.GLU(dim=1)]
    return nn.Sequential(*layers)


def default_sle_ratio(model_size: int) -> int:
    """How many times larger the gated map is than the gating one: S/16 clamped to [4, 16].

    FastGAN gates 4→64, 8→128, 16→256 (ratio 16) at 256 px and above; at 32 px that ratio would leave no
    target, so small sizes use 4 (4→16, 8→32), which keeps two excitations in a 32-px generator.
    """
    return min(16, max(4, model_size // 16))


class FastGenerator(nn.Module):
    """Noise z (B×nz) → images B×channels×S×S in [-1, 1], with skip-layer excitation.

    4×4 from z by a 4×4 transposed conv (BatchNorm → GLU), then one upsampling block per doubling
    (two convs at 8, 32, 128, … px, one at 16, 64, …, as FastGAN alternates them); the map at each
    resolution r ∈ {4, 8, 16, 32} with r·ratio ≤ S gates the map at r·ratio (`sle_pairs`); a 3×3 conv
    and tanh make the image.
    """

    def __init__(
        self,
        model_size: int = 32,
        channels: int = 3,
        nz: int = 128,
        width: int = 16,
        max_width: int = 128,
        sle_ratio: int | None = None,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        self.model_size = check_model_size(model_size, minimum=16)
        self.channels, self.nz = channels, nz
        widths = feature_widths(self.model_size, width, max_width)
        ratio = default_sle_ratio(self.model_size) if sle_ratio is None else int(sle_ratio)
        self.sle_pairs = [(r, r * ratio) for r in (4, 8, 16, 32) if r * ratio <= self.model_size]
        if not self.sle_pairs:
            raise ValueError(f"sle_ratio {ratio} leaves no skip-layer excitation at model_size {model_size}")
        deconv = nn.ConvTranspose2d(nz, widths[4] * 2, 4, bias=False)
        self.initial = nn.Sequential(
            spectral_norm(deconv) if spectral else deconv, nn.BatchNorm2d(widths[4] * 2), nn.GLU(dim=1)
        )
        self.ups = nn.ModuleDict(
            {
                str(res): _up_block(widths[res // 2], widths[res], int(math.log2(res)) % 2 == 1, spectral)
                for res in sorted(widths)[1:]
            }
        )
        self.sles = nn.ModuleDict(
            {
                str(high): SkipLayerExcitation(widths[low], widths[high], spectral)
                for low, high in self.sle_pairs
            }
        )
        self.to_image = nn.Sequential(
            _conv(widths[self.model_size], channels, 3, padding=1, sn=spectral), nn.Tanh()
        )

    def forward(self, z: Tensor) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.nz:
            raise ValueError(f"FastGenerator expects noise B×{self.nz}, got {tuple(z.shape)}")
        x = self.initial(z[:, :, None, None])
        maps = {4: x}
        gated_from = {high: low for low, high in self.sle_pairs}
        for res_key, block in self.ups.items():
            res = int(res_key)
            x = block(x)
            if res in gated_from:
                x = self.sles[res_key](maps[gated_from[res]], x)
            maps[res] = x
        return self.to_image(x)


class _ResidualDown(nn.Module):
    """Halve the side: mean of (4×4 s2 conv, 3×3 conv) and (pool, 1×1 conv); FastGAN's DownBlockComp."""

    def __init__(self, in_ch: int, out_ch: int, sn: bool = True) -> None:
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.main = nn.Sequential(
            _conv(in_ch, out_ch, 4, 2, 1, sn), nn.BatchNorm2d(out_ch), act,
            _conv(out_ch, out_ch, 3, 1, 1, sn), nn.BatchNorm2d(out_ch), act,
        )  # fmt: skip
        self.direct = nn.Sequential(
            nn.AvgPool2d(2), _conv(in_ch, out_ch, 1, sn=sn), nn.BatchNorm2d(out_ch), act
        )

    def forward(self, x: Tensor) -> Tensor:
        return (self.main(x) + self.direct(x)) / 2


class _Decoder(nn.Module):
    """8×8 features → image at `out_size`: upsampling blocks of `hidden` channels, 3×3 conv, tanh.

    `hidden` is the discriminator's full-resolution width: decoders wider than that would cost more
    than the discriminator they regularise.
    """

    def __init__(self, in_ch: int, channels: int, out_size: int, hidden: int, sn: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch, res = in_ch, 8
        while res < out_size:
            layers.append(_up_block(ch, hidden, two_convs=False, sn=sn))
            ch, res = hidden, res * 2
        layers += [_conv(ch, channels, 3, padding=1, sn=sn), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class FastDiscriminator(nn.Module):
    """Self-supervised discriminator: images (B×channels×S×S, [-1, 1]) → patch logits B×25.

    A 3×3 stem, residual downsampling blocks to 8×8, then 1×1 conv → BatchNorm → leaky ReLU → 4×4 conv
    (no padding) giving 5×5 logits per image, each a real/fake score of an overlapping region; the losses
    average them. `forward_with_reconstruction` (real images only) also decodes
    - the whole image at `rec_size` from the 8×8 features, and
    - quarter `part` (`nets.gan.QUARTERS`: 0 top-left … 3 bottom-right) at `rec_size` from that quarter of
      the 16×16 features,
    for the caller's reconstruction loss against the real image resized / quarter-cropped to `rec_size`
    (`stages.gan_losses.reconstruction_loss` builds those targets). `rec_size` defaults to S/2 capped at
    128 (FastGAN: 128).
    """

    def __init__(
        self,
        model_size: int = 32,
        channels: int = 3,
        width: int = 16,
        max_width: int = 128,
        rec_size: int | None = None,
        spectral: bool = True,
    ) -> None:
        super().__init__()
        self.model_size = check_model_size(model_size, minimum=16)
        self.rec_size = check_model_size(min(128, self.model_size // 2) if rec_size is None else rec_size)
        widths = feature_widths(self.model_size, width, max_width, lowest=8)
        self.stem = nn.Sequential(
            _conv(channels, widths[self.model_size], 3, padding=1, sn=spectral), nn.LeakyReLU(0.2)
        )
        self.downs = nn.ModuleDict(
            {
                str(res // 2): _ResidualDown(widths[res], widths[res // 2], spectral)
                for res in sorted(widths)[:0:-1]
            }
        )
        self.head = nn.Sequential(
            _conv(widths[8], widths[8], 1, sn=spectral),
            nn.BatchNorm2d(widths[8]),
            nn.LeakyReLU(0.2),
            _conv(widths[8], 1, 4, sn=spectral),
        )
        hidden = widths[self.model_size]
        self.decode_whole = _Decoder(widths[8], channels, self.rec_size, hidden, spectral)
        self.decode_part = _Decoder(widths[16], channels, self.rec_size, hidden, spectral)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits B×25 (real/fake scores; the hinge losses average them)."""
        return self._features(x)[0]

    def forward_with_reconstruction(self, x: Tensor, part: int) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, whole image at rec_size, quarter `part` at rec_size) for a batch of real images."""
        logits, feat_16, feat_8 = self._features(x)
        return logits, self.decode_whole(feat_8), self.decode_part(quarter_crop(feat_16, part))

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if x.shape[-2:] != (self.model_size, self.model_size):
            raise ValueError(f"discriminator expects {self.model_size}-px images, got {tuple(x.shape)}")
        h = self.stem(x)
        maps = {self.model_size: h}
        for res_key, block in self.downs.items():
            h = block(h)
            maps[int(res_key)] = h
        return self.head(maps[8]).flatten(1), maps[16], maps[8]
