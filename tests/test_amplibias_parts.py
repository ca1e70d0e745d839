"""AmpliBias's pieces without the CLI, each against a hand computation: the EMA, the reconstruction term, the
label rule's tie-break, the memorisation figure (tests/test_amplibias.py runs the stages end to end)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffinject.stages.amplibias import AmpliBiasGAN
from diffinject.stages.amplibias_generate import memorisation_summary, nearest

TINY = {"model_size": 16, "nz": 8, "g_width": 4, "d_width": 4, "max_width": 16}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_update_ema_is_the_hand_formula() -> None:
    module = AmpliBiasGAN(**TINY)
    with torch.no_grad():
        for p in module.generator.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in module.ema_generator.parameters()]
    module.update_ema(0.9)
    online_params = list(module.generator.parameters())
    for ema, old, online in zip(module.ema_generator.parameters(), before, online_params, strict=True):
        torch.testing.assert_close(ema, 0.9 * old + 0.1 * online)


def test_reconstruction_term_trains_the_decoders() -> None:
    torch.manual_seed(0)
    module = AmpliBiasGAN(**TINY, reconstruction_weight=2.0)
    real = torch.rand(4, 3, 16, 16) * 2 - 1
    fake = module.generator(torch.randn(4, 8)).detach()
    torch.manual_seed(1)
    terms = module.discriminator_loss(real, fake, part=2)
    torch.testing.assert_close(terms["d_loss"], terms["d_real"] + terms["d_fake"] + 2.0 * terms["rec"])

    # without the term the decoders get no gradient; with it, D's own loss teaches them to reconstruct
    off = AmpliBiasGAN(**TINY, reconstruction_weight=0.0)
    off.discriminator_loss(real, fake, part=2)["d_loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in off.discriminator.decode_whole.parameters())
    optimizer = torch.optim.Adam(module.discriminator.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = module.discriminator_loss(real, fake, part=2)
        optimizer.zero_grad()
        loss["d_loss"].backward()
        optimizer.step()
        losses.append(float(loss["rec"]))
    assert losses[-1] < 0.6 * losses[0], losses


def test_nearest_prefers_the_lower_position_on_ties() -> None:
    refs = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    position, distance = nearest(torch.tensor([[1.0, 0.0], [0.0, 1.9], [1.0, 1.0]]), refs)
    assert position.tolist() == [0, 2, 0] and distance[1].item() == pytest.approx(0.1)


def test_memorisation_summary_against_hand_numbers() -> None:
    topk = np.array([0.2, 0.4, 0.4, 0.6])
    copies = memorisation_summary(np.zeros(5), topk)
    assert copies["fraction_below_topk_min"] == 1.0 and copies["median_ratio"] == 0.0
    new = memorisation_summary(np.array([0.1, 0.3, 0.5, 0.7]), topk)
    assert new["fraction_below_topk_min"] == 0.25 and new["fraction_below_topk_median"] == 0.5
    assert new["median_ratio"] == pytest.approx(0.4 / 0.4)
    assert new["samples_to_nearest_topk"]["mean"] == pytest.approx(0.4)
    assert sum(new["samples_to_nearest_topk"]["histogram"]) == 4
