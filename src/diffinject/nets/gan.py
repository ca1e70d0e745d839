"""Shared pieces of the two GAN baselines' networks (issue 22): size checks, channel widths, quarter crops.

The networks themselves live in two modules:
- `nets.gan_style`: A²'s style-based generator (StyleGAN2-lite) and its residual discriminator;
- `nets.gan_fast`: AmpliBias's FastGAN-lite generator (skip-layer excitation) and its self-supervised
  (auto-encoding) discriminator.

Every network here works in **model space**: images are B×C×S×S tensors in [-1, 1] at `model_size` S, a
power of two. Dataset images ([0, 1] at their own side) go in through
`diffinject.diffusion.preprocess.to_model_space(images, S)` and generated images come back with
`from_model_space(x, image_size)`: the same pad-black-or-resize rule as the diffusion stage, so a 28-px
CMNIST digit becomes a 32-px model image without resampling its thin strokes, and back exactly.
"""

from __future__ import annotations

from torch import Tensor

#: quarter index → (row half, column half): 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
QUARTERS = ((0, 0), (0, 1), (1, 0), (1, 1))


def check_model_size(model_size: int, minimum: int = 8) -> int:
    """`model_size` must be a power of two ≥ `minimum`: every block doubles or halves the side."""
    size = int(model_size)
    if size < minimum or size & (size - 1):
        raise ValueError(f"GAN model_size must be a power of two >= {minimum}, got {model_size}")
    return size


def feature_widths(model_size: int, width: int, max_width: int, lowest: int = 4) -> dict[int, int]:
    """Channels per resolution: `width` at the full size, doubled at each halving, capped at `max_width`.

    The usual GAN shape (few channels where the maps are large, more where they are small) keeps the cost
    per resolution roughly flat; `width` is the one knob that scales the whole network.
    """
    if width < 1 or max_width < 1:
        raise ValueError(f"GAN widths must be positive, got width={width}, max_width={max_width}")
    widths = {}
    res = lowest
    while res <= model_size:
        widths[res] = min(max_width, width * (model_size // res))
        res *= 2
    return widths


def quarter_crop(x: Tensor, part: int) -> Tensor:
    """The quarter `part` (see `QUARTERS`) of B×C×H×W images or feature maps (H and W even).

    The self-supervised discriminator decodes the same quarter of its 16×16 features that the
    reconstruction loss crops from the real image, so both sides use this one convention.
    """
    if part not in range(4):
        raise ValueError(
            f"quarter index must be 0..3 (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), got {part}"
        )
    height, width = x.shape[-2], x.shape[-1]
    if height % 2 or width % 2:
        raise ValueError(f"quarter_crop needs an even height and width, got {tuple(x.shape)}")
    row, col = QUARTERS[part]
    h, w = height // 2, width // 2
    return x[..., row * h : (row + 1) * h, col * w : (col + 1) * w]
