"""Injection modes beside the paper's slerp: AdaIN blend, window, initial-latent statistics, swapped roles and
bias-model guidance — pure functions against hand formulas, then the inject stage on a tiny trained UNet."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffinject.data import CMNISTDataModule
from diffinject.diffusion import (
    Guidance,
    Injection,
    ddim_generate,
    ddim_timesteps,
    linear_alphas_cumprod,
    to_model_space,
)
from diffinject.diffusion.hspace import adain_inject
from diffinject.diffusion.steering import (
    classifier_guidance_fn,
    match_channel_stats,
    model_to_image,
    structure_similarity,
)
from diffinject.nets import build_classifier
from diffinject.stages import InjectionPredictModule
from inject_helpers import train_tiny_unet, write_unet_export

STEPS = 10


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ pure functions
def test_adain_moves_channel_statistics_and_keeps_the_pattern() -> None:
    g = torch.Generator().manual_seed(0)
    h, c = torch.randn(2, 4, 5, 5, generator=g), 3 * torch.randn(2, 4, 5, 5, generator=g) + 1
    assert adain_inject(h, c, 0.0) is h
    out = adain_inject(h, c, 1.0)
    torch.testing.assert_close(out.mean(dim=(2, 3)), c.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), c.std(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    # the spatial pattern (standardised map) is the style's own
    standard = (h - h.mean(dim=(2, 3), keepdim=True)) / h.std(dim=(2, 3), keepdim=True)
    out_standard = (out - out.mean(dim=(2, 3), keepdim=True)) / out.std(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out_standard, standard, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adain_inject(h, c, 0.25), h + 0.25 * (out - h), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        adain_inject(h, c, 1.5)


def test_match_channel_stats() -> None:
    g = torch.Generator().manual_seed(1)
    x, ref = torch.randn(3, 3, 8, 8, generator=g), 2 * torch.randn(3, 3, 8, 8, generator=g) - 1
    out = match_channel_stats(x, ref)
    torch.testing.assert_close(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(2, 3)), ref.std(dim=(2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(match_channel_stats(x, ref, weight=0.0), x)


def test_injection_window() -> None:
    h = torch.zeros(1, 10, 2, 1, 1)
    window = Injection(h, 0.5, t_edit=400, t_start=700)
    grid = list(range(0, 1000, 100))
    assert [t for i, t in enumerate(grid) if window.applies(i, t, 10)] == [400, 500, 600, 700]
    with pytest.raises(ValueError, match="t_edit <= t_start"):
        Injection(h, 0.5, t_edit=400, t_start=300)
    with pytest.raises(ValueError, match="blend must be one of"):
        Injection(h, 0.5, t_edit=400, blend="swap")


class _ConstEps(torch.nn.Module):
    """A stub 'UNet' whose ε is a fixed function of x (its mid block is never used without injection)."""

    def __init__(self) -> None:
        super().__init__()
        self.mid_block = torch.nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x


def test_guided_step_matches_the_hand_formula() -> None:
    abar = linear_alphas_cumprod()
    grid = ddim_timesteps(1000, 2)  # τ = 0, 500: one step 500 → 0, then 0 → clean
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    direction = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    guidance = Guidance(lambda x0: direction, scale=0.3, t_min=500)
    out = ddim_generate(_ConstEps(), x, abar, grid, guidance=guidance)
    # by hand: step 500 → 0 with x̂₀ pushed, direction from the plain ε; then the plain last step
    a, a_prev = float(abar[500]), float(abar[0])
    eps = 0.5 * x
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + 0.3 * direction
    x1 = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    eps1 = 0.5 * x1
    expected = (x1 - math.sqrt(1 - a_prev) * eps1) / math.sqrt(a_prev)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():  # as Lightning's predict runs it
        torch.testing.assert_close(ddim_generate(_ConstEps(), x, abar, grid, guidance=guidance), out)
    unguided = ddim_generate(_ConstEps(), x, abar, grid)
    off = ddim_generate(_ConstEps(), x, abar, grid, guidance=Guidance(lambda x0: direction, scale=0.0))
    torch.testing.assert_close(off, unguided)
    assert (out - unguided).abs().max() > 1e-2


def test_classifier_guidance_ascends_log_probability() -> None:
    torch.manual_seed(0)
    net = build_classifier("mlp", 10, 3, 28, pretrained=False).eval()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    target = torch.tensor([1, 2, 3, 4])
    grad = classifier_guidance_fn(net, target, 28, fade=False)(x0)
    assert grad.shape == x0.shape
    assert grad[..., :2, :].abs().max() == 0  # the padding the classifier never sees gets no push
    torch.testing.assert_close(grad.flatten(1).pow(2).mean(dim=1), torch.ones(4), atol=1e-4, rtol=0)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        logits = net(model_to_image(x, 28))
        return torch.log_softmax(logits, 1).gather(1, target.view(-1, 1)).squeeze(1)

    assert bool((log_p(x0 + 0.01 * grad) > log_p(x0)).all())
    with torch.inference_mode():  # inputs made under inference mode (Lightning's predict) still work
        x_inf, target_inf = x0.clone(), target.clone()
    with torch.inference_mode(False), torch.enable_grad():
        torch.testing.assert_close(classifier_guidance_fn(net, target_inf, 28, fade=False)(x_inf), grad)
    faded = classifier_guidance_fn(net, target, 28, fade=True)(x0)
    p = log_p(x0).exp().view(-1, 1, 1, 1)
    torch.testing.assert_close(faded, grad * (1 - p), atol=1e-5, rtol=1e-4)


def test_structure_similarity_ignores_appearance_and_sees_structure() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    gain = torch.tensor([0.5, 2.0, 1.0]).view(1, 3, 1, 1)
    # the same pattern with another per-channel gain and offset ("rendered differently") scores ~1
    assert bool((structure_similarity(x * gain + 0.3, x) > 0.98).all())
    other = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert bool((structure_similarity(other, x) < 0.3).all())
    assert bool((structure_similarity(-x, x) < -0.9).all())


def test_structure_term_pulls_towards_the_reference() -> None:
    torch.manual_seed(0)
    net = build_classifier("mlp", 10, 3, 28, pretrained=False).eval()
    reference = torch.rand(2, 3, 28, 28) * 2 - 1
    x0 = reference + 0.5 * torch.randn(2, 3, 28, 28)
    target = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs a reference"):
        classifier_guidance_fn(net, target, 28, structure_weight=1.0)
    plain = classifier_guidance_fn(net, target, 28)(x0)
    pulled = classifier_guidance_fn(net, target, 28, reference=reference, structure_weight=5.0)(x0)
    step = 0.05
    before = structure_similarity(x0, reference)
    assert bool((structure_similarity(x0 + step * pulled, reference) > before).all())
    assert (pulled - plain).abs().mean() > 0.1


# ------------------------------------------------------------------------------------------ inject stage
@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("modes")
    data = CMNISTDataModule(root=str(root / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    digits = torch.stack([train[i]["image"] for i in range(8)])
    write_unet_export(train_tiny_unet(to_model_space(digits, 16), steps=300), root / "unet", image_size=28)
    torch.manual_seed(0)
    net = build_classifier("mlp", 10, 3, 28, pretrained=False)
    hparams = {"arch": "mlp", "num_classes": 10, "in_channels": 3, "image_size": 28}
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, root / "bias.ckpt")
    batch = {
        "style_image": digits[:4],
        "content_image": digits[4:8],
        "content_index": torch.arange(4, 8),
        "noise_seed": torch.arange(4),
    }
    return {"unet": str(root / "unet"), "bias": str(root / "bias.ckpt"), "batch": batch}


def _inject(setup: dict, **options: object) -> torch.Tensor:
    module = InjectionPredictModule(setup["unet"], steps=STEPS, **options)
    with torch.no_grad():
        return module.inject(setup["batch"])


def test_start_from_content_at_gamma_zero_regenerates_the_content(setup: dict) -> None:
    batch = setup["batch"]
    from_style = _inject(setup, gamma=0.0, t_boost=0)
    from_content = _inject(setup, gamma=0.0, t_boost=0, start_from="content")
    # η = 0 everywhere: each is the DDIM round trip of its own image
    assert (from_style - batch["style_image"]).abs().mean() < 0.05
    assert (from_content - batch["content_image"]).abs().mean() < 0.05
    assert (from_content - from_style).abs().mean() > 0.05


def test_modes_change_the_output(setup: dict) -> None:
    plain = _inject(setup, gamma=0.0)
    for options in (
        {"gamma": 0.7, "blend": "adain"},
        {"gamma": 0.7, "t_edit": 400, "t_start": 700},
        {"gamma": 0.0, "start_from": "content_stats"},
        {"gamma": 0.7, "start_from": "content", "inject_from": "style"},
    ):
        out = _inject(setup, **options)
        assert out.shape == plain.shape
        assert (out - plain).abs().mean() > 1e-3, options


def test_bias_guidance_moves_the_bias_models_prediction(setup: dict) -> None:
    batch = setup["batch"]
    base = _inject(setup, gamma=0.0, t_boost=0, start_from="content", bias_model=setup["bias"])
    guided = _inject(
        setup, gamma=0.0, t_boost=0, start_from="content", bias_model=setup["bias"], guidance_scale=0.5
    )
    module = InjectionPredictModule(setup["unet"], steps=STEPS, bias_model=setup["bias"])
    net = module.bias_net
    assert net is not None
    with torch.no_grad():
        target = net(batch["style_image"]).argmax(1)

        def log_p(x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(net(x), 1).gather(1, target.view(-1, 1)).squeeze(1)

        assert float(log_p(guided).mean()) > float(log_p(base).mean())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blend": "mix"}, "blend must be one of"),
        ({"t_start": 300, "t_edit": 400}, "t_start"),
        ({"start_from": "noise"}, "start_from must be one of"),
        ({"inject_from": "both"}, "inject_from must be one of"),
        ({"guidance_scale": 0.5}, "needs bias_model"),
        ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
        ({"guidance_smooth": -1}, "guidance_smooth must be >= 0"),
    ],
)
def test_mode_options_are_validated(setup: dict, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InjectionPredictModule(setup["unet"], **kwargs)


def test_missing_bias_model_is_named(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="bias fit stage"):
        InjectionPredictModule(setup["unet"], bias_model=str(tmp_path / "best.ckpt"), guidance_scale=0.1)
