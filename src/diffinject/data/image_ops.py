"""Batched numpy image operations behind the corruptions (no OpenCV, scikit-image, SciPy or ImageMagick).

Arrays are float32, batch first: N×H×W for single-channel layers, N×H×W×3 for RGB in [0, 1].
"""

from __future__ import annotations

import numpy as np


def gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    radius = max(1, int(truncate * sigma + 0.5))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_filter(
    layers: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0
) -> np.ndarray:
    """Separable Gaussian blur over the two spatial axes (1, 2) of an N×H×W(×C) array.

    `mode` follows SciPy's names: "nearest" repeats the edge pixel, "reflect" mirrors including it.
    """
    if sigma <= 0:
        return layers.astype(np.float32, copy=True)
    kernel = gaussian_kernel(sigma, truncate)
    radius = len(kernel) // 2
    pad_mode = {"nearest": "edge", "reflect": "symmetric"}[mode]
    out = layers.astype(np.float32)
    for axis in (1, 2):
        width = [(0, 0)] * out.ndim
        width[axis] = (radius, radius)
        padded = np.pad(out, width, mode=pad_mode)
        size = out.shape[axis]
        acc = np.zeros_like(out)
        for k, weight in enumerate(kernel):
            acc += weight * np.take(padded, np.arange(k, k + size), axis=axis)
        out = acc
    return out


def motion_blur(layers: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """One-sided Gaussian streak per image, the kernel ImageMagick's MotionBlurImage uses.

    Tap i (0 <= i < 2·ceil(radius)+1) samples the pixel at offset round(i·(cos a, sin a)) with weight
    exp(-i²/2σ²), weights normalised; out-of-image samples repeat the edge.
    """
    n, h, w = layers.shape
    taps = np.arange(2 * int(np.ceil(radius)) + 1)
    weights = np.exp(-(taps.astype(np.float64) ** 2) / (2 * sigma**2))
    weights = (weights / weights.sum()).astype(np.float32)
    angles = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rows = np.arange(h)[None, :, None]
    cols = np.arange(w)[None, None, :]
    batch = np.arange(n)[:, None, None]
    out = np.zeros_like(layers, dtype=np.float32)
    for i, weight in zip(taps, weights, strict=True):
        dx = np.ceil(i * np.cos(angles) - 0.5).astype(np.int64)[:, None, None]
        dy = np.ceil(i * np.sin(angles) - 0.5).astype(np.int64)[:, None, None]
        out += weight * layers[batch, np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    return out


def zoom_center(layers: np.ndarray, factor: float) -> np.ndarray:
    """Enlarge the centre of each N×H×W layer by `factor` (bilinear) and crop back to H×W."""
    n, h, w = layers.shape
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = layers[:, top : top + ch, left : left + cw]
    # sample the crop on the zoomed grid, pixel centres aligned with the crop's corners
    out_h, out_w = int(round(ch * factor)), int(round(cw * factor))
    ys = np.linspace(0, ch - 1, out_h)
    xs = np.linspace(0, cw - 1, out_w)
    zoomed = bilinear(crop, ys, xs)
    trim_y, trim_x = (out_h - h) // 2, (out_w - w) // 2
    return zoomed[:, trim_y : trim_y + h, trim_x : trim_x + w]


def bilinear(layers: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Sample N×H×W layers on the separable grid ys × xs (coordinates in pixels, inside the image)."""
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, layers.shape[1] - 1)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, layers.shape[2] - 1)
    y1 = np.minimum(y0 + 1, layers.shape[1] - 1)
    x1 = np.minimum(x0 + 1, layers.shape[2] - 1)
    wy = (ys - y0)[None, :, None].astype(np.float32)
    wx = (xs - x0)[None, None, :].astype(np.float32)
    top = layers[:, y0][:, :, x0] * (1 - wx) + layers[:, y0][:, :, x1] * wx
    bottom = layers[:, y1][:, :, x0] * (1 - wx) + layers[:, y1][:, :, x1] * wx
    return top * (1 - wy) + bottom * wy


def plasma_fractal(n: int, mapsize: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """N diamond-square height maps (mapsize a power of two, wrap-around), each normalised to [0, 1].

    As in Hendrycks' fog: the random offset amplitude starts at 100 (times a uniform in ±100) and is divided
    by `decay` at every halving of the step.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    grid = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step, wibble = mapsize, 100.0

    def jitter(mean: np.ndarray) -> np.ndarray:
        return mean / 4 + wibble * rng.uniform(-wibble, wibble, mean.shape)

    while step >= 2:
        half = step // 2
        corners = grid[:, 0::step, 0::step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        grid[:, half::step, half::step] = jitter(square)
        centres = grid[:, half::step, half::step]
        corners = grid[:, 0::step, 0::step]
        grid[:, 0::step, half::step] = jitter(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        )
        grid[:, half::step, 0::step] = jitter(
            centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        )
        step //= 2
        wibble /= decay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    grid /= np.maximum(grid.max(axis=(1, 2), keepdims=True), 1e-12)
    return grid.astype(np.float32)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] (…×3) -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = rgb.max(axis=-1)
    delta = value - rgb.min(axis=-1)
    safe_delta = np.where(delta > 0, delta, 1.0)
    saturation = np.where(value > 0, delta / np.where(value > 0, value, 1.0), 0.0)
    hue = np.where(
        value == r,
        (g - b) / safe_delta,
        np.where(value == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta),
    )
    hue = np.where(delta > 0, (hue / 6.0) % 1.0, 0.0)
    return np.stack([hue, saturation, value], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(np.int64) % 6
    choices_r = [v, q, p, p, t, v]
    choices_g = [t, v, v, q, p, p]
    choices_b = [p, p, t, v, v, q]
    r = np.choose(sector, choices_r)
    g = np.choose(sector, choices_g)
    b = np.choose(sector, choices_b)
    return np.stack([r, g, b], axis=-1).astype(np.float32)


def frost_textures(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural frost: count×size×size×3 in [0, 1], bluish-white ice needles over a cloudy fractal base.

    Stands in for Hendrycks' six frost photographs (not redistributable here): a multi-octave noise base
    (frosted haze) plus thousands of short straight needles with side branches (crystals), lightly blurred.
    """
    textures = np.empty((count, size, size), dtype=np.float32)
    for k in range(count):
        base = np.zeros((size, size), dtype=np.float32)
        for octave, cells in enumerate((4, 8, 16, 32)):
            coarse = rng.uniform(0.0, 1.0, size=(1, cells + 1, cells + 1)).astype(np.float32)
            coords = np.linspace(0, cells, size)
            base += 0.5**octave * bilinear(coarse, coords, coords)[0]
        base = (base - base.min()) / max(float(base.max() - base.min()), 1e-6)
        crystals = np.zeros((size, size), dtype=np.float32)
        n_needles = size * size // 12
        starts = rng.uniform(0, size, size=(n_needles, 2))
        angles = rng.uniform(0, np.pi, size=n_needles)
        lengths = rng.uniform(2.0, size / 8, size=n_needles)
        strength = rng.uniform(0.3, 1.0, size=n_needles)
        for branch_angle, scale in ((0.0, 1.0), (np.pi / 3, 0.45), (-np.pi / 3, 0.45)):
            t = np.linspace(0.0, 1.0, 24)[None, :]
            offset = 0.5 * lengths[:, None] if branch_angle else 0.0
            direction = angles[:, None] + branch_angle
            y = (
                starts[:, :1]
                + offset * np.sin(angles[:, None])
                + t * scale * lengths[:, None] * np.sin(direction)
            )
            x = (
                starts[:, 1:]
                + offset * np.cos(angles[:, None])
                + t * scale * lengths[:, None] * np.cos(direction)
            )
            yi = np.clip(np.rint(y).astype(np.int64), 0, size - 1).ravel()
            xi = np.clip(np.rint(x).astype(np.int64), 0, size - 1).ravel()
            np.maximum.at(crystals, (yi, xi), np.repeat(strength * scale, t.shape[1]).astype(np.float32))
        crystals = gaussian_filter(crystals[None], 0.6)[0]
        crystals /= max(float(crystals.max()), 1e-6)
        textures[k] = np.clip(0.45 * base + 0.9 * crystals, 0.0, 1.0)
    tint = np.array([0.86, 0.93, 1.0], dtype=np.float32)  # ice is slightly blue
    return textures[..., None] * tint
