"""Bounded, preallocated cache of content inversions for `InjectionPredictModule`.

Each content image is DDIM-inverted once; its h trajectory [S, C, h, w] and inverted x_T [C, H, W] (fp32)
are reused by every later pair. The trajectories grow with K and the image size (6.5 MB per content at
256 px with S = 50), so the cache has a memory bound: rows are preallocated (for the number of contents the
run will need when known, else grown by doubling — never re-concatenated per batch), and once the bound
is reached further contents are not stored but re-inverted in each batch that needs them (a logged note
says so). Cached or recomputed, a content's h is the same (inversions run at one fixed batch shape, see
`InjectionPredictModule.micro_batch`), so the bound changes speed, never pixels.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

MIB = 1 << 20


class ContentCache:
    """Pool of content trajectories, `h[slot]` [S, C, h, w] and `latent[slot]` [C, H, W], under a byte bound.

    Args:
        max_mb: bound on the pool's memory in MiB (h and x_T together); None: unbounded; 0: cache nothing.
    """

    def __init__(self, max_mb: float | None) -> None:
        if max_mb is not None and max_mb < 0:
            raise ValueError(f"content_cache_mb must be >= 0 (0: no cache, null: unbounded), got {max_mb}")
        self.max_bytes = None if max_mb is None else int(max_mb * MIB)
        self.expected: int | None = None
        self.clear()

    def clear(self) -> None:
        self.h: Tensor | None = None
        self.latent: Tensor | None = None
        self.slot: dict[int, int] = {}
        self.recomputed = 0  # content inversions that did not fit and will be redone when needed again
        self._noted = False

    def reserve(self, count: int) -> None:
        """Expect `count` distinct contents: the first allocation makes room for all (bound allowing)."""
        self.expected = max(0, int(count))

    @property
    def size(self) -> int:
        return len(self.slot)

    @property
    def capacity(self) -> int:
        return 0 if self.h is None else int(self.h.shape[0])

    @property
    def nbytes(self) -> int:
        if self.h is None or self.latent is None:
            return 0
        return self.h.element_size() * self.h.numel() + self.latent.element_size() * self.latent.numel()

    def max_entries(self, h: Tensor, latent: Tensor) -> int | None:
        """How many contents fit the bound (None: unbounded), from one batch of trajectories."""
        if self.max_bytes is None:
            return None
        entry = h[0].numel() * 4 + latent[0].numel() * 4
        return self.max_bytes // entry

    def to(self, device: torch.device) -> None:
        if self.h is not None and self.latent is not None:
            self.h, self.latent = self.h.to(device), self.latent.to(device)

    def _grow(self, needed: int, h: Tensor, latent: Tensor, limit: int | None) -> None:
        """Allocate (or enlarge by doubling) the pool to hold `needed` rows, capped at `limit`."""
        want = max(needed, self.expected or 0, 2 * self.capacity)
        rows = want if limit is None else min(want, limit)
        if rows <= self.capacity:
            return
        new_h = torch.empty((rows, *h.shape[1:]), dtype=torch.float32, device=h.device)
        new_latent = torch.empty((rows, *latent.shape[1:]), dtype=torch.float32, device=latent.device)
        if self.h is not None and self.latent is not None and self.size:
            new_h[: self.size] = self.h[: self.size].to(h.device)
            new_latent[: self.size] = self.latent[: self.size].to(latent.device)
        self.h, self.latent = new_h, new_latent

    def add(self, ids: list[int], h: Tensor, latent: Tensor) -> list[int]:
        """Store the trajectories of new contents `ids` (rows of h / latent) as far as the bound allows.

        Returns the ids that were stored; the others are counted in `recomputed` and noted once.
        """
        limit = self.max_entries(h, latent)
        room = len(ids) if limit is None else max(0, min(len(ids), limit - self.size))
        if room and self.size + room > self.capacity:
            self._grow(self.size + room, h, latent, limit)
        assert room == 0 or (self.h is not None and self.latent is not None)
        stored = []
        for row, cid in enumerate(ids[:room]):
            slot = self.size
            self.h[slot] = h[row]  # type: ignore[index]
            self.latent[slot] = latent[row]  # type: ignore[index]
            self.slot[cid] = slot
            stored.append(cid)
        if len(ids) > room:
            self.recomputed += len(ids) - room
            if not self._noted:
                self._noted = True
                per = (h[0].numel() + latent[0].numel()) * 4 / MIB
                rank_zero_info(
                    f"content cache full: {self.size} contents cached ({self.nbytes / MIB:.1f} MiB, "
                    f"{per:.2f} MiB each, bound content_cache_mb={self.max_bytes / MIB:g}); further contents "
                    "are re-inverted in every batch that needs them (same images, slower) — raise "
                    "content_cache_mb to cache them"
                )
        return stored

    def gather(
        self, content_ids: list[int], fresh: dict[int, tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(h pool, slots, x_T per sample) for a batch: the cache itself when it holds every content, else a
        small per-batch pool of the batch's distinct contents (cached rows + `fresh` uncached inversions)."""
        if all(c in self.slot for c in content_ids):
            assert self.h is not None and self.latent is not None
            slots = torch.tensor([self.slot[c] for c in content_ids], device=self.h.device)
            return self.h[: self.size], slots, self.latent[slots]
        unique = list(dict.fromkeys(content_ids))
        rows_h, rows_latent = [], []
        for cid in unique:
            if cid in self.slot:
                assert self.h is not None and self.latent is not None
                rows_h.append(self.h[self.slot[cid]])
                rows_latent.append(self.latent[self.slot[cid]])
            else:
                rows_h.append(fresh[cid][0])
                rows_latent.append(fresh[cid][1])
        device = rows_h[0].device
        pool = torch.stack([r.to(device) for r in rows_h])
        latents = torch.stack([r.to(device) for r in rows_latent])
        where = {cid: row for row, cid in enumerate(unique)}
        slots = torch.tensor([where[c] for c in content_ids], device=device)
        return pool, slots, latents[slots]
