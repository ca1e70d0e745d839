"""Diffusion training throughput: plain eager fp32 diffusers loop vs P2DiffusionModule's optimised path.

Both paths train the same UNet preset (same initial weights, same batch, same run) with one ε-MSE step
(forward, backward, AdamW, EMA update) per iteration:
- `eager_fp32`: the textbook diffusers loop: fp32, NCHW, `torch.optim.AdamW` defaults, per-tensor EMA
  (what `diffusers.training_utils.EMAModel` does by default). PyTorch's default TF32 settings are kept.
- `optimized`: `P2DiffusionModule.model_inputs` / `p2_loss` / `update_ema` under bf16 autocast,
  channels_last, fused AdamW (from the module's `configure_optimizers`), P2 weighting;
  `optimized_compiled` adds `torch.compile` (with `--compile`).
FLOPs of one training step come from `torch.utils.flop_counter.FlopCounterMode` (forward + backward of the
UNet at this batch); MFU = FLOPs/step × steps/s ÷ `--peak-tflops` (the device's peak, your choice of
precision; JSON null when not given). Peak memory: CUDA allocator peak per path; on CPU the process peak RSS
after each path (monotone: later paths include earlier ones).

    python benchmarks/diffusion_train.py --preset cmnist-paper --batch-size 128 --steps 30 --device cuda \
        --peak-tflops 989 --compile          # H100 SXM dense bf16 peak
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffinject.diffusion import linear_alphas_cumprod, to_model_space
from diffinject.nets.unet import UNET_PRESETS, build_unet
from diffinject.stages.diffusion import P2DiffusionModule

T = 1000

#: optimised-path variants: (channels_last, bf16 autocast, torch.compile mode or None)
VARIANTS: dict[str, tuple[bool, bool, str | None]] = {
    "eager_fp32": (False, False, None),  # the plain loop (not the module)
    "module_fp32": (False, False, None),
    "module_bf16": (False, True, None),
    "optimized": (True, True, None),
    "optimized_compiled": (True, True, "default"),
    "bf16_compiled": (False, True, "default"),
    "bf16_compiled_cudagraphs": (False, True, "reduce-overhead"),
    "bf16_compiled_max_autotune": (False, True, "max-autotune"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cmnist-paper", choices=sorted(UNET_PRESETS))
    parser.add_argument("--image-size", type=int, default=None, help="data side (default: 28 for cmnist-*)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per path (compile needs more)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for the MFU")
    parser.add_argument("--compile", action="store_true", help="also time the optimised path with compile")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=sorted(VARIANTS),
        help="paths to time (default: eager_fp32 optimized [+ optimized_compiled with --compile])",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_step_fn(unet: torch.nn.Module, images: torch.Tensor, size: int) -> Callable[[], torch.Tensor]:
    """The plain diffusers training step (ε-MSE, AdamW defaults, per-tensor EMA)."""
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    abar = linear_alphas_cumprod(T).float().to(images.device)

    def step() -> torch.Tensor:
        x0 = to_model_space(images, size)
        t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.mul_(0.999).add_(p, alpha=0.001)
        return loss

    return step


def optimized_step_fn(
    module: P2DiffusionModule, images: torch.Tensor, bf16: bool = True
) -> Callable[[], torch.Tensor]:
    """The module's own step: bf16 autocast, channels_last, fused AdamW, P2 loss, foreach EMA."""
    module.setup("fit")
    optimizer = module.configure_optimizers()["optimizer"]
    device_type = images.device.type
    batch = {"image": images}

    def step() -> torch.Tensor:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16):
            x0 = module.model_inputs(batch)
            t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
            loss = module.p2_loss(x0, t, torch.randn_like(x0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.update_ema(0.999)
        return loss

    return step


def train_step_flops(unet: torch.nn.Module, images: torch.Tensor, size: int) -> int:
    """FLOPs of forward + backward of the UNet on this batch (counted once, fp32, eager)."""
    probe = copy.deepcopy(unet)
    x0 = to_model_space(images, size)
    t = torch.randint(0, T, (x0.shape[0],), device=x0.device)
    with FlopCounterMode(display=False) as counter:
        probe(x0, t).sample.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def time_path(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    )
    return {
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "final_loss": float(losses[-1].detach()),
        "peak_memory_mib": round(peak, 1),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = UNET_PRESETS[args.preset].sample_size
    image_size = args.image_size or (28 if args.preset.startswith("cmnist") else size)
    torch.manual_seed(args.seed)
    images = torch.rand(args.batch_size, 3, image_size, image_size, device=device)

    base = build_unet(args.preset).to(device)
    flops = train_step_flops(base, images, size)
    initial = copy.deepcopy(base.state_dict())

    def optimized(name: str) -> Callable[[], torch.Tensor]:
        channels_last, bf16, mode = VARIANTS[name]
        module = P2DiffusionModule(
            args.preset, image_size=image_size, channels_last=channels_last, fused_optimizer=True
        )
        module.unet.load_state_dict(initial)
        module.ema_unet.load_state_dict(initial)
        if mode is not None:  # what `compile: true` does, with the mode under test
            module.hparams.compile = True
            object.__setattr__(module, "_compiled_unet", torch.compile(module.unet, mode=mode))
        return optimized_step_fn(module.to(device), images, bf16=bf16)

    names = args.variants or ["eager_fp32", "optimized"] + (["optimized_compiled"] if args.compile else [])
    paths: dict[str, Callable[[], Callable[[], torch.Tensor]]] = {
        name: (lambda: eager_step_fn(base.train(), images, size))
        if name == "eager_fp32"
        else (lambda name=name: optimized(name))
        for name in names
    }

    results = {}
    for name, make in paths.items():
        torch.manual_seed(args.seed)
        warmup = args.warmup + (5 if VARIANTS[name][2] else 0)
        started = time.perf_counter()
        try:
            result = time_path(make(), device, warmup, args.steps)
        except Exception as error:  # one failing variant (e.g. a compile mode) must not lose the others
            results[name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            continue
        result["wall_with_warmup_s"] = time.perf_counter() - started
        result["images_per_s"] = result["steps_per_s"] * args.batch_size
        achieved = flops * result["steps_per_s"]
        result["achieved_tflops"] = achieved / 1e12
        result["mfu"] = achieved / (args.peak_tflops * 1e12) if args.peak_tflops else None
        results[name] = result
    base_ips = results.get("eager_fp32", {}).get("images_per_s")
    return {
        "benchmark": "diffusion_train",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": args.preset,
        "params": sum(p.numel() for p in base.parameters()),
        "image_size": image_size,
        "model_size": size,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "warmup_steps": args.warmup,
        "train_step_flops": flops,
        "peak_tflops": args.peak_tflops,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "paths": results,
        "speedup_vs_eager_fp32": {
            k: v["images_per_s"] / base_ips for k, v in results.items() if base_ips and "images_per_s" in v
        },
    }


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(run(parse_args(argv)), indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
