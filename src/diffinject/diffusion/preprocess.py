"""Map dataset images to the diffusion model's input space and back (shared by training and injection).

Rule (stored in `diffusion_info.json` as `"preprocess": "pad-black-or-resize"`):
- values: [0, 1] → [-1, 1] (x ↦ 2x − 1);
- size: an image smaller than the model size is **padded** with −1 (black) evenly on all sides, the extra
  pixel (odd difference) going to the bottom/right; an image larger than the model size is **resized**
  (bilinear, antialiased) down; equal sizes are left alone.
Padding is exact to undo (crop) and black matches the CMNIST background, so 28 px digits become 32 px
without resampling the colour of thin strokes; resizing is the fallback for sizes that padding cannot reach.
`from_model_space` applies the inverse (crop or resize back) and clamps to [0, 1].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

PREPROCESS_RULE = "pad-black-or-resize"


def _pad_amounts(orig: int, size: int) -> tuple[int, int]:
    before = (size - orig) // 2
    return before, size - orig - before


def _check(images: Tensor, what: str) -> None:
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"{what}: expected square images B×C×H×W, got shape {tuple(images.shape)}")


def to_model_space(images: Tensor, size: int) -> Tensor:
    """[0, 1] images B×C×H×H → [-1, 1] tensors B×C×size×size (pad with −1 or resize, see module doc)."""
    _check(images, "to_model_space")
    x = images * 2.0 - 1.0
    orig = images.shape[-1]
    if orig < size:
        before, after = _pad_amounts(orig, size)
        x = F.pad(x, (before, after, before, after), value=-1.0)
    elif orig > size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def from_model_space(x: Tensor, orig_size: int, clamp: bool = True) -> Tensor:
    """Inverse of `to_model_space`: [-1, 1] B×C×S×S → [0, 1] B×C×orig×orig (crop or resize back), clamped.

    `clamp=False` keeps values outside [0, 1] (and their gradient), e.g. for guidance on x̂₀.
    """
    _check(x, "from_model_space")
    size = x.shape[-1]
    if orig_size < size:
        before, _ = _pad_amounts(orig_size, size)
        x = x[..., before : before + orig_size, before : before + orig_size]
    elif orig_size > size:
        x = F.interpolate(x, size=(orig_size, orig_size), mode="bilinear", align_corners=False)
    x = (x + 1.0) / 2.0
    return x.clamp(0.0, 1.0) if clamp else x
