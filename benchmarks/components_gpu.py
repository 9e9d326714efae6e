"""Forward/backward time and memory of the headline recipe's components, fp32 against bf16 autocast, same run.

    python benchmarks/components_gpu.py [--recipe recipes/repae_sdvae_dinov2.yaml] [--batch 32] [--device cuda]

Builds the recipe's tokenizer, encoder and denoiser with random weights (no downloads), then times per phase:
VAE encode, VAE decode, encoder forward, denoiser forward+backward (the REPA-E SiT pass, hidden tokens at depth 8
projected). Reports median milliseconds per batch, images/s, peak memory, the bf16/fp32 speed ratio and the largest
relative deviation of bf16 outputs from fp32 (a sanity check of mixed precision, not a tolerance).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from repae.build import build_recipe
from repae.plugins import load_plugins
from repae.recipe import read_recipe

RANDOM_WEIGHTS = ["tokenizer.weights=null", "tokenizer.latent_stats=null", "encoders.0.weights=random"]


def timed(fn, device: str, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def rel_dev(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/repae_sdvae_dinov2.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    resolved = read_recipe(args.recipe, RANDOM_WEIGHTS, load_plugins().registry)
    built = {b.label: b.component for b in build_recipe(resolved, device=args.device)}
    vae, encoder, denoiser = built["tokenizer"], built["encoders.0"], built["denoiser"]
    resolution = resolved.get("denoiser")[0].config.resolution
    g = torch.Generator(device="cpu").manual_seed(0)
    b = args.batch
    raw = torch.randint(0, 256, (b, 3, resolution, resolution), dtype=torch.uint8, generator=g).to(args.device)
    images = raw.float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(images).mean
    t = torch.rand(b, generator=g).to(args.device)
    y = torch.randint(0, denoiser.num_classes, (b,), generator=g).to(args.device)
    noise = torch.randn(z.shape, generator=g).to(args.device)
    x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * noise

    def denoiser_step():
        denoiser.zero_grad(set_to_none=True)
        out = denoiser(x_t, t, y, feature_depths=(8,))
        proj = denoiser.project(out.hidden[8])[0]
        loss = (out.prediction.float() - (noise - z)).square().mean() - proj.float().mean()
        loss.backward()
        return proj.detach()  # the prediction starts at zero (adaLN-Zero); the projector output does not

    phases = {
        "vae encode": lambda: vae.encode(images).mean,
        "vae decode": lambda: vae.decode(z),
        "encoder forward": lambda: encoder(raw),
        "denoiser fwd+bwd": denoiser_step,
    }
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
          f"batch {b}, {resolution}px, torch {torch.__version__}")
    print("| phase | fp32 ms | bf16 ms | fp32/bf16 | bf16 img/s | peak GiB (bf16) | max rel. dev. bf16 vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, fn in phases.items():
        grad = name.startswith("denoiser")
        with torch.set_grad_enabled(grad):
            fp32_s, ref = timed(fn, args.device, args.repeat)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16):
                bf16_s, out = timed(fn, args.device, args.repeat)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
        print(f"| {name} | {fp32_s * 1e3:.1f} | {bf16_s * 1e3:.1f} | {fp32_s / bf16_s:.2f} | {b / bf16_s:.0f} | "
              f"{peak:.1f} | {rel_dev(out, ref):.2e} |")


if __name__ == "__main__":
    main()
