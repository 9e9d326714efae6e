"""One full REPA-E training step of repae against the official REPA-E code, same configuration, same weights and inputs.

    python benchmarks/vs_reference.py --reference PATH [--device cpu|cuda] [--json]
                                      [--no-lpips] [--rounds 5] [--warmup 1] [--batch B] [--threads N] [--compile]

``PATH`` is a local checkout of the official code (github.com/End2End-Diffusion/REPA-E, e.g. commit 3ad8046). It is
never part of this repository nor a dependency: it is put on ``sys.path`` at run time and its own modules are driven
(``models/sit.py``, ``models/autoencoder.py``, ``loss/losses.py`` with ``loss/lpips.py`` and
``loss/discriminator.py``, ``utils.py``, ``configs/l1_lpips_kl_gan.yaml``). Its step lives inline in
``train_repae.py`` (which imports accelerate and wandb), so the few lines of that loop are re-enacted here in the same
order with the same calls: VAE forward, ``vae_loss_fn(..., "generator")``, the alignment pass through the frozen
eval-mode SiT (``align_only``), backward, clip 1.0, VAE AdamW step -> ``vae_loss_fn(..., "discriminator")``, backward,
clip, discriminator step -> SiT pass in train mode on ``z.detach()`` with the saved t and noise, backward, clip, SiT
step -> EMA of the SiT (parameters and float buffers, one tensor at a time, as ``update_ema``). repae runs its engine
(``PhasedTrainer.compute_gradients`` + ``apply_gradients``) on the recipe ``recipes/repae_sdvae_dinov2.yaml``
with overrides (sizes, random weights, no downloads).

What is the same on both sides:

- configuration: ``--device cpu`` runs a small one (128 px, f4 KL-VAE with base width 32, SiT-S/2 width with 6
  blocks aligned at block 4, a 2-block ViT target encoder with 256 tokens, the reference PatchGAN, LPIPS-VGG16,
  batch 4, fp32); ``--device cuda`` the headline one (256 px, SD-VAE f8d4, SiT-XL/2 aligned at block 8, DINOv2-B,
  batch 32, bf16 autocast, TF32 on as in the reference's defaults);
- weights: repae builds everything with random initialisation; its VAE, SiT (+ latent BatchNorm) and discriminator
  state dicts are loaded strictly into the reference's modules (repae uses the official key layouts); LPIPS gets one
  random file (official ``vgg.pth`` layout with the VGG16 trunk included) that each side reads with its own loader;
  the frozen target encoder is one module shared by both sides (the reference's encoder comes from torch.hub, not
  from its repository), the reference side running the reference loop's DINOv2 preprocessing on it (``/255``,
  ImageNet ``Normalize``, bicubic resize to 14 px per token: ``14 * H / token_stride``, 224 px at 256 as in the
  reference; its own formula ``224 * (H // 256)`` gives 0 px below 256);
- inputs: uint8 images, labels, posterior noise, t, diffusion noise and the label-dropout draw, one set per step,
  identical for both sides (the reference's own draws are replaced: posterior noise and t/noise are passed in, the
  label-dropout mask is reproduced by seeding the global generator right before its SiT training pass);
- the step's numbers: the step-0 losses of both sides (both start from the same weights) are compared; their largest
  absolute difference is printed and must stay under ``LOSS_TOL`` (else the exit code is 1: the timings would not
  compare the same computation);
- precision (fp32 on CPU, bf16 autocast on CUDA with the losses in fp32 on both sides), batch size, no
  ``torch.compile`` unless ``--compile`` (then: repae ``trainer.compile=true``; the reference compiles SiT, VAE and
  its loss module, as its training script does by default).

Not timed on either side: building, weight copies, drawing the inputs. Timed: from the images and randomness on the
device to the EMA update (CUDA synchronised before and after), including the target encoder's forward. Steps are
interleaved A/B (the side that goes first alternates every round) after ``--warmup`` steps of each side.
``--no-lpips`` drops LPIPS on both sides (repae: ``losses.lpips=null``; reference: its ``perceptual_loss`` module is
replaced by one returning 0, the only way to switch it off there).

Known differences, reported rather than hidden: the reference's SiT ``pos_embed`` is an ``nn.Parameter`` that its loop
makes trainable (``requires_grad(model, True)``) and its AdamW updates, repae's is a frozen buffer (counted apart);
the reference's alignment pass still applies the final layer after the ``break``; the reference SiT-S presets pass
no ``decoder_hidden_size`` (default 768) and cannot run at width 384, so ``SiT(...)`` is built with explicit fields.

Output: parameter counts per part for both sides (they must match), the step-0 loss comparison, and per side the
median / min / max step seconds (wall clock) over the rounds, the ratio repae / reference of the medians, and the
same for the process CPU time of a step (``time.process_time``; with one thread on a CPU shared with other jobs it is
far less disturbed than the wall clock). Progress lines go to stderr. ``--json`` prints one object instead
(``ratio``, ``repae_step_s``, ``reference_step_s``, min/max, ``cpu_ratio``, rounds, counts, loss differences).
Exit codes: 0 ok, 1 the sides disagree (counts or step-0 losses), 2 usage error (e.g. no reference checkout).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "repae_sdvae_dinov2.yaml"
REFERENCE_FILES = ("train_repae.py", "models/sit.py", "models/autoencoder.py", "loss/losses.py", "loss/lpips.py",
                   "loss/perceptual_loss.py", "loss/discriminator.py", "utils.py", "configs/l1_lpips_kl_gan.yaml")
LOSS_TOL = {"cpu": 1e-4, "cuda": 5e-2}
"""Largest absolute difference allowed between the step-0 losses of the two sides (fp32 on CPU; bf16 on CUDA)."""

CONFIGS = {
    "small": {
        "resolution": 128, "batch": 4, "num_classes": 1000, "precision": "fp32",
        "vae": {"latent_channels": 4, "ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                "resolution": 256},
        "sit": {"size": "S/2", "depth": 6}, "align_depth": 4,
        "encoder": {"size": "tiny", "embed_dim": 192, "depth": 2, "num_heads": 3, "image_size": 224,
                    "token_stride": 8},
    },
    "headline": {
        "resolution": 256, "batch": 32, "num_classes": 1000, "precision": "bf16",
        "vae": {"latent_channels": 4, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                "resolution": 256},
        "sit": {"size": "XL/2"}, "align_depth": 8,
        "encoder": {"size": "vit-b14", "token_stride": 16},
    },
}
"""The two configurations: ``small`` on CPU, ``headline`` (the REPA-E paper's) on CUDA."""

# The reference's settings that this benchmark passes to its code (its argparse defaults in train_repae.py).
REF_ARGS = {"path_type": "linear", "prediction": "v", "weighting": "uniform", "cfg_prob": 0.1, "proj_coeff": 0.5,
            "vae_align_proj_coeff": 1.5, "max_grad_norm": 1.0, "lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.0,
            "eps": 1e-8, "ema_decay": 0.9999, "bn_momentum": 0.1}


class UsageError(Exception):
    """A problem with the command line or the reference checkout (exit code 2)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="local checkout of github.com/End2End-Diffusion/REPA-E")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="default: small on cpu, headline on cuda")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-lpips", action="store_true", help="time both sides without LPIPS")
    parser.add_argument("--rounds", type=int, default=5, help="timed A/B rounds (at least 5 for a claim)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first (step 0 is compared)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the configuration's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on cpu: 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--rounds must be >= 1, --warmup >= 0, --batch >= 1")
    return args


def check_reference(path: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"--reference {path}: no such folder; clone https://github.com/End2End-Diffusion/REPA-E "
                         "somewhere outside this repository and pass its path")
    missing = [f for f in REFERENCE_FILES if not (root / f).is_file()]
    if missing:
        raise UsageError(f"--reference {path} is not a checkout of End2End-Diffusion/REPA-E: missing "
                         f"{', '.join(missing)}")
    return root.resolve()


# -- the reference side ----------------------------------------------------------------------------------------------
class _Section(dict):
    """Attribute access over a dict, as the reference reads its OmegaConf loss config (``config.losses.kl_weight``,
    ``loss_config.get(...)``)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return _Section(value) if isinstance(value, dict) else value


def _as_omegaconf_reads_it(value):
    """PyYAML (YAML 1.1) reads ``1e-6`` as a string, OmegaConf as a float: convert such strings as OmegaConf does."""
    if isinstance(value, dict):
        return {k: _as_omegaconf_reads_it(v) for k, v in value.items()}
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def import_reference(root: Path) -> types.SimpleNamespace:
    """The reference's modules, imported from ``root`` (and checked to come from there)."""
    import importlib

    sys.path.insert(0, str(root))
    try:
        import dictdot  # noqa: F401  (the reference's models/autoencoder.py wraps decode()'s output in it)
    except ImportError:  # a stand-in with the one behaviour used here: attribute access to dict keys
        shim = types.ModuleType("dictdot")

        class dictdot(dict):  # noqa: N801 - the package's own spelling
            def __getattr__(self, name):
                try:
                    return self[name]
                except KeyError:
                    raise AttributeError(name) from None

        shim.dictdot = dictdot
        sys.modules["dictdot"] = shim
    names = {"sit": "models.sit", "autoencoder": "models.autoencoder", "losses": "loss.losses",
             "lpips": "loss.lpips", "utils": "utils"}
    mods = {}
    for key, name in names.items():
        try:
            mods[key] = importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"cannot import the reference's {name} from {root}: {exc} (install what its "
                             "environment.yml lists, e.g. timm, einops)") from None
        origin = Path(getattr(mods[key], "__file__", "") or "").resolve()
        if root not in origin.parents:
            raise UsageError(f"'{name}' resolves to {origin}, not to the reference checkout {root}: another module "
                             "of that name shadows it")
    return types.SimpleNamespace(**mods)


def _vgg16_features():
    """A randomly initialised VGG16 convolutional trunk with torchvision's layer indices."""
    from torchvision.models.vgg import cfgs, make_layers

    return make_layers(cfgs["D"], batch_norm=False)


def write_lpips_weights(path: Path, seed: int) -> None:
    """Random LPIPS weights in the official full layout (``net.slice<k>.<j>.*`` and ``lin<k>.model.1.weight``), read by
    both sides' own loaders."""
    import torch

    torch.manual_seed(seed)
    features = _vgg16_features()
    slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
    state = {}
    for k, (lo, hi) in enumerate(slices, start=1):
        for j in range(lo, hi):
            for name, tensor in features[j].state_dict().items():
                state[f"net.slice{k}.{j}.{name}"] = tensor.clone()
    for k, channels in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, channels, 1, 1) * 0.1
    torch.save(state, path)


def _no_perceptual():
    """A module that stands in for the reference's ``perceptual_loss`` under ``--no-lpips`` (it has no switch to skip
    LPIPS): returns 0."""
    import torch

    class NoPerceptual(torch.nn.Module):
        def forward(self, inputs, reconstructions):
            return inputs.new_zeros(())

    return NoPerceptual()


class ReferenceSide:
    """The official modules built and filled with repae's weights, and the step of ``train_repae.py`` re-enacted."""

    def __init__(self, ref, cfg: dict, repae_side: RepaeSide, lpips_file: Path, use_lpips: bool, device,
                 compile_: bool):
        import torch
        import yaml

        self.torch = torch
        self.ref = ref
        self.device = device
        self.autocast_dtype = torch.bfloat16 if cfg["precision"] == "bf16" else None
        vae_cfg = cfg["vae"]
        # VAE: the reference's AutoencoderKL, its Encoder/Decoder built at the configuration's widths (its factories
        # fix ch=128 and the f8/f16 level lists).
        ac = ref.autoencoder
        vae = ac.AutoencoderKL(embed_dim=vae_cfg["latent_channels"], ch_mult=vae_cfg["ch_mult"])
        arch = dict(ch=vae_cfg["ch"], ch_mult=vae_cfg["ch_mult"], num_res_blocks=vae_cfg["num_res_blocks"],
                    attn_resolutions=tuple(vae_cfg["attn_resolutions"]), resolution=vae_cfg["resolution"],
                    z_channels=vae_cfg["latent_channels"])
        vae.encoder = ac.Encoder(**arch)
        vae.decoder = ac.Decoder(**arch)
        vae.load_state_dict(repae_side.tokenizer.state_dict(), strict=True)
        # SiT, built with explicit fields (the S presets leave decoder_hidden_size at 768).
        den = repae_side.denoiser
        sit = ref.sit.SiT(
            path_type=REF_ARGS["path_type"], input_size=den.input_size, patch_size=den.patch_size,
            in_channels=den.in_channels, hidden_size=den.hidden_size, decoder_hidden_size=den.hidden_size,
            encoder_depth=cfg["align_depth"], depth=len(den.blocks), num_heads=den.num_heads,
            mlp_ratio=den.blocks[0].mlp.fc1.out_features / den.hidden_size, class_dropout_prob=REF_ARGS["cfg_prob"],
            num_classes=den.num_classes, z_dims=[repae_side.encoder.embed_dim],
            projector_dim=den.projectors[0][0].out_features,
            bn_momentum=REF_ARGS["bn_momentum"], fused_attn=True, qk_norm=False,
        )
        from repae_sit.checkpoint import to_official

        sit.load_state_dict(to_official(den, repae_side.normalizer.state_dict()), strict=True)
        # The loss module with the reference's own YAML; its downloads (torchvision VGG16, LPIPS vgg.pth) redirected.
        loss_cfg = _Section(_as_omegaconf_reads_it(
            yaml.safe_load((ref.root / "configs" / "l1_lpips_kl_gan.yaml").read_text())))
        self.perceptual_weight = float(loss_cfg["losses"]["perceptual_weight"])
        self.kl_weight = float(loss_cfg["losses"]["kl_weight"])
        lp = ref.lpips
        saved = (lp.models, lp.get_ckpt_path)
        lp.models = types.SimpleNamespace(
            vgg16=lambda weights=None: types.SimpleNamespace(features=_vgg16_features()),
            VGG16_Weights=types.SimpleNamespace(IMAGENET1K_V1=None))
        lp.get_ckpt_path = lambda name, root, check=False: str(lpips_file)
        try:
            loss_fn = ref.losses.ReconstructionLoss_Single_Stage(loss_cfg)
        finally:
            lp.models, lp.get_ckpt_path = saved
        self.lpips_module = loss_fn.perceptual_loss.lpips if use_lpips else None
        if not use_lpips:
            loss_fn.perceptual_loss = _no_perceptual()
        loss_fn.discriminator.load_state_dict(repae_side.discriminator.state_dict(), strict=True)
        self.vae, self.sit, self.loss_fn = vae.to(device), sit.to(device), loss_fn.to(device)
        self.ema = copy.deepcopy(self.sit)
        self._requires_grad(self.ema, False)
        self._update_ema(self.ema, self.sit, decay=0.0)
        self.sit.eval()
        self.ema.eval()
        self.vae.eval()
        self.encoder = repae_side.encoder  # the same frozen module
        opt = dict(lr=REF_ARGS["lr"], betas=REF_ARGS["betas"], weight_decay=REF_ARGS["weight_decay"], eps=REF_ARGS["eps"])
        self.opt_sit = torch.optim.AdamW(self.sit.parameters(), **opt)
        self.opt_vae = torch.optim.AdamW(self.vae.parameters(), **opt)
        self.opt_loss = torch.optim.AdamW(self.loss_fn.parameters(), **opt)
        if compile_:
            self.sit = torch.compile(self.sit)
            self.vae = torch.compile(self.vae)
            self.loss_fn = torch.compile(self.loss_fn)

    @staticmethod
    def _requires_grad(module, flag: bool) -> None:
        for p in module.parameters():
            p.requires_grad = flag

    def _update_ema(self, ema, model, decay: float) -> None:
        """The reference's ``update_ema``: every parameter, float buffers likewise, other buffers copied; one tensor
        at a time."""
        with self.torch.no_grad():
            ema_params = dict(ema.named_parameters())
            for name, p in model.named_parameters():
                ema_params[name.replace("module.", "")].mul_(decay).add_(p.data, alpha=1 - decay)
            ema_buffers = dict(ema.named_buffers())
            for name, b in model.named_buffers():
                target = ema_buffers[name.replace("module.", "")]
                if b.dtype in (self.torch.bfloat16, self.torch.float16, self.torch.float32, self.torch.float64):
                    target.mul_(decay).add_(b.data, alpha=1 - decay)
                else:
                    target.copy_(b)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _targets(self, raw):
        """The reference loop's target features: ``preprocess_raw_image`` of the DINOv2 branch (``/255``, ImageNet
        ``Normalize``, bicubic resize; 14 px per token) then the patch tokens after the final norm."""
        torch = self.torch
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        from torchvision.transforms import Normalize

        side = 14 * (raw.shape[-1] // self.encoder.token_stride)
        x = raw / 255.0
        x = Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(x)
        x = torch.nn.functional.interpolate(x, side, mode="bicubic")
        backbone = self.encoder.backbone
        return backbone.forward_features(x)[:, backbone.num_prefix_tokens:]

    def step(self, inputs: dict, step: int) -> dict:
        torch = self.torch
        clip = torch.nn.utils.clip_grad_norm_
        raw, labels = inputs["images"], inputs["labels"]
        with torch.no_grad(), self._autocast():
            zs = [self._targets(raw)]
        self.vae.train()
        self.sit.train()
        with self._autocast():
            processed = self.ref.utils.preprocess_imgs_vae(raw)
            posterior = self.vae.encode(processed)
            z = posterior.mean + posterior.std * inputs["eps_posterior"]  # posterior.sample() with the given noise
            recon = self.vae.decode(z).sample
            loss_kwargs = dict(path_type=REF_ARGS["path_type"], prediction=REF_ARGS["prediction"],
                               weighting=REF_ARGS["weighting"])
            self._requires_grad(self.sit, False)
            self.sit.eval()
            vae_loss, vae_dict = self.loss_fn(processed, recon, posterior, step, "generator")
            vae_loss = vae_loss.mean()
            loss_kwargs["align_only"] = True
            align = self.sit(x=z, y=labels, zs=zs, loss_kwargs=loss_kwargs, time_input=inputs["t"].view(-1, 1, 1, 1),
                             noises=inputs["noise"])
            vae_loss = vae_loss + REF_ARGS["vae_align_proj_coeff"] * align["proj_loss"].mean()
            time_input, noises = align["time_input"], align["noises"]
            vae_loss.backward()
            grad_norm_vae = clip(self.vae.parameters(), REF_ARGS["max_grad_norm"])
            self.opt_vae.step()
            self.opt_vae.zero_grad(set_to_none=True)

            d_loss, d_dict = self.loss_fn(processed, recon, posterior, step, "discriminator")
            d_loss = d_loss.mean()
            d_loss.backward()
            grad_norm_disc = clip(self.loss_fn.parameters(), REF_ARGS["max_grad_norm"])
            self.opt_loss.step()
            self.opt_loss.zero_grad(set_to_none=True)

            self._requires_grad(self.sit, True)
            self.sit.train()
            loss_kwargs["weighting"] = REF_ARGS["weighting"]
            loss_kwargs["align_only"] = False
            torch.manual_seed(inputs["drop_seed"])  # its label dropout draws the mask repae was given
            out = self.sit(x=z.detach(), y=labels, zs=zs, loss_kwargs=loss_kwargs, time_input=time_input,
                           noises=noises)
            sit_loss = out["denoising_loss"].mean() + REF_ARGS["proj_coeff"] * out["proj_loss"].mean()
            sit_loss.backward()
            grad_norm_sit = clip(self.sit.parameters(), REF_ARGS["max_grad_norm"])
            self.opt_sit.step()
            self.opt_sit.zero_grad(set_to_none=True)
            self._update_ema(self.ema, getattr(self.sit, "_orig_mod", self.sit), REF_ARGS["ema_decay"])
        return {
            "reconstruction": vae_dict["reconstruction_loss"], "lpips": vae_dict["perceptual_loss"],
            "kl": vae_dict["kl_loss"] / self.kl_weight, "gan generator": vae_dict["gan_loss"],
            "repa (tokenizer)": align["proj_loss"].mean().detach(), "tokenizer total": vae_loss.detach(),
            "discriminator hinge": d_loss.detach(), "logits_real": d_dict["logits_real"],
            "logits_fake": d_dict["logits_fake"], "diffusion": out["denoising_loss"].mean().detach(),
            "repa (denoiser)": out["proj_loss"].mean().detach(), "denoiser total": sit_loss.detach(),
            "grad norm tokenizer": grad_norm_vae, "grad norm discriminator": grad_norm_disc,
            "grad norm denoiser": grad_norm_sit,
        }


# -- the repae side ---------------------------------------------------------------------------------------------------
class RepaeSide:
    """The REPA-E recipe built through repae's registry with the configuration's sizes and random weights."""

    def __init__(self, cfg: dict, batch: int, lpips_file: Path | None, device, compile_: bool):
        from repae.build import build_recipe
        from repae.plugins import load_plugins
        from repae.recipe import read_recipe

        res, vae, sit, enc = cfg["resolution"], cfg["vae"], cfg["sit"], cfg["encoder"]
        overrides = [
            f"dataset={{name: synthetic, resolution: {res}, num_classes: {cfg['num_classes']}, num_images: {2 * batch}}}",
            "tokenizer.weights=null", "tokenizer.latent_stats=null",
            *[f"tokenizer.{k}={json.dumps(v)}" for k, v in vae.items()],
            "encoders.0.weights=random", *[f"encoders.0.{k}={v}" for k, v in enc.items()],
            *[f"denoiser.{k}={v}" for k, v in sit.items()], f"denoiser.num_classes={cfg['num_classes']}",
            f"losses.repa.depth={cfg['align_depth']}", "losses.gan.weights=null",
            *([f"losses.lpips.weights={lpips_file}", "losses.lpips.double_scale_inputs=true"] if lpips_file
              else ["losses.lpips=null"]),
            f"trainer.batch_size={batch}", f"trainer.precision={cfg['precision']}", "trainer.num_workers=0",
            f"trainer.compile={'true' if compile_ else 'false'}",
        ]
        self.overrides = overrides
        registry = load_plugins(select={"repae"}).registry
        resolved = read_recipe(str(RECIPE), overrides, registry)
        built = {b.label: b.component for b in build_recipe(resolved, device=str(device))}
        self.trainer = built["trainer"]
        self.trainer.setup()
        self.tokenizer = self.trainer.tokenizer
        self.denoiser = self.trainer.denoiser
        self.normalizer = self.trainer.normalizer
        self.encoder = self.trainer.encoders[0]
        self.discriminator = self.trainer.parts["discriminator"]
        self.lpips_module = self.trainer.losses["lpips"].lpips if "lpips" in self.trainer.losses else None

    def step(self, inputs: dict, step: int) -> dict:
        from repae.train.context import StepInputs

        trainer = self.trainer
        step_inputs = StepInputs(labels=inputs["labels"], images=inputs["images"],
                                 eps_posterior=inputs["eps_posterior"], t=inputs["t"], noise=inputs["noise"],
                                 drop_labels=inputs["drop"])
        logs = trainer.compute_gradients([step_inputs], step)
        norms = trainer.apply_gradients()
        get = logs.get
        return {
            "reconstruction": get("tokenizer/reconstruction"), "lpips": get("tokenizer/lpips"),
            "kl": get("tokenizer/kl"), "gan generator": get("tokenizer/gan"),
            "repa (tokenizer)": get("tokenizer/repa"), "tokenizer total": get("tokenizer/total"),
            "discriminator hinge": get("discriminator/gan"), "logits_real": get("discriminator/gan.logits_real"),
            "logits_fake": get("discriminator/gan.logits_fake"), "diffusion": get("denoiser/diffusion"),
            "repa (denoiser)": get("denoiser/repa"), "denoiser total": get("denoiser/total"),
            "grad norm tokenizer": norms.get("tokenizer/grad_norm"),
            "grad norm discriminator": norms.get("discriminator/grad_norm"),
            "grad norm denoiser": norms.get("denoiser/grad_norm"),
        }


# -- shared ----------------------------------------------------------------------------------------------------------
def make_inputs(cfg: dict, batch: int, repae_side: RepaeSide, steps: int, seed: int, device) -> list[dict]:
    """One set of global inputs per step, used by both sides."""
    import torch

    res = cfg["resolution"]
    latent = (cfg["vae"]["latent_channels"], res // repae_side.tokenizer.downsample,
              res // repae_side.tokenizer.downsample)
    out = []
    for k in range(steps):
        g = torch.Generator().manual_seed(seed * 1000 + k)
        drop_seed = seed * 1000 + k + 7919
        torch.manual_seed(drop_seed)
        labels = torch.randint(0, cfg["num_classes"], (batch,), generator=g).to(device)
        drop = torch.rand(labels.shape[0], device=labels.device) < REF_ARGS["cfg_prob"]  # as the reference draws it
        out.append({
            "images": torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g).to(device),
            "labels": labels, "eps_posterior": torch.randn(batch, *latent, generator=g).to(device),
            "t": torch.rand(batch, generator=g).to(device), "noise": torch.randn(batch, *latent, generator=g).to(device),
            "drop": drop, "drop_seed": drop_seed,
        })
    return out


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def parameter_counts(repae_side: RepaeSide, reference: ReferenceSide) -> tuple[dict, list[str]]:
    """Per part: (repae, reference) parameter counts, and the disagreements (the SiT's ``pos_embed`` accounted)."""
    ref_sit = getattr(reference.sit, "_orig_mod", reference.sit)
    pos = ref_sit.pos_embed.numel() if isinstance(ref_sit.pos_embed, reference.torch.nn.Parameter) else 0
    repae_pos_buffer = "pos_embed" in dict(repae_side.denoiser.named_buffers())
    rows = {
        "VAE": (count(repae_side.tokenizer), count(getattr(reference.vae, "_orig_mod", reference.vae))),
        "SiT (without pos_embed)": (count(repae_side.denoiser), count(ref_sit) - pos),
        "SiT pos_embed": (repae_side.denoiser.pos_embed.numel() if repae_pos_buffer else 0, pos),
        "discriminator": (count(repae_side.discriminator),
                          count(getattr(reference.loss_fn, "_orig_mod", reference.loss_fn).discriminator)),
        "LPIPS (frozen)": (count(repae_side.lpips_module), count(reference.lpips_module)),
        "target encoder (frozen, shared)": (count(repae_side.encoder), count(repae_side.encoder)),
    }
    problems = [f"{part}: repae {a:,} vs reference {b:,}" for part, (a, b) in rows.items() if a != b]
    return rows, problems


def check_lpips_weights(repae_side: RepaeSide, reference: ReferenceSide) -> None:
    """Both LPIPS networks hold the same weights (the reference loads non-strictly: a key mismatch would be silent)."""
    if repae_side.lpips_module is None:
        return
    ours = repae_side.lpips_module.state_dict()
    theirs = reference.lpips_module.state_dict()
    pairs = [(f"heads.{k}.weight", f"lin{k}.model.1.weight") for k in range(5)]
    for key in ours:
        if key.startswith("features."):
            j = int(key.split(".")[1])
            k = 1 + sum(j >= lo for lo in (4, 9, 16, 23))
            pairs.append((key, f"net.slice{k}.{key.split('.', 1)[1]}"))
    for a, b in pairs:
        if not reference.torch.equal(ours[a].cpu(), theirs[b].cpu()):
            raise RuntimeError(f"LPIPS weights differ between the sides: repae {a} vs reference {b}")


def _value(x) -> float | None:
    if x is None:
        return None
    return float(x.detach().float().item()) if hasattr(x, "detach") else float(x)


def run(args: argparse.Namespace) -> tuple[dict, int]:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # the reference's torch.cuda.amp.autocast decorator
    root = check_reference(args.reference)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    device = torch.device(device_name)
    cfg = CONFIGS[args.config or ("headline" if device.type == "cuda" else "small")]
    batch = args.batch or cfg["batch"]
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # the reference's default --allow-tf32; global, so both sides get it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ref = import_reference(root)
    ref.root = root
    with tempfile.TemporaryDirectory() as tmp:
        lpips_file = Path(tmp) / "lpips-random.pt"
        write_lpips_weights(lpips_file, args.seed)
        torch.manual_seed(args.seed)
        ours = RepaeSide(cfg, batch, None if args.no_lpips else lpips_file, device, args.compile)
        theirs = ReferenceSide(ref, cfg, ours, lpips_file, not args.no_lpips, device, args.compile)
    check_lpips_weights(ours, theirs)
    counts, count_problems = parameter_counts(ours, theirs)
    steps = args.warmup + args.rounds
    inputs = make_inputs(cfg, batch, ours, steps, args.seed, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(side, k: int) -> tuple[float, float, dict]:
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        logs = side.step(inputs[k], k)
        sync()
        return time.perf_counter() - start, time.process_time() - cpu_start, logs

    times: dict[str, list[float]] = {"repae": [], "reference": []}
    cpu_times: dict[str, list[float]] = {"repae": [], "reference": []}
    step0: dict[str, dict] = {}
    for k in range(steps):
        order = (("repae", ours), ("reference", theirs)) if k % 2 == 0 else (("reference", theirs), ("repae", ours))
        for name, side in order:
            seconds, cpu_seconds, logs = timed(side, k)
            if k == 0:
                step0[name] = {key: _value(v) for key, v in logs.items()}
            if k >= args.warmup:
                times[name].append(seconds)
                cpu_times[name].append(cpu_seconds)
            print(f"  step {k} {'warm-up' if k < args.warmup else 'timed'} {name}: {seconds:.3f} s wall, "
                  f"{cpu_seconds:.3f} s CPU", file=sys.stderr, flush=True)
    diffs = {}
    for key, a in step0["repae"].items():
        b = step0["reference"].get(key)
        if a is not None and b is not None:
            diffs[key] = abs(a - b)
    loss_keys = [k for k in diffs if not k.startswith("grad norm")]
    max_loss_diff = max(diffs[k] for k in loss_keys)
    tol = LOSS_TOL[device.type]
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "ratio": med["repae"] / med["reference"],
        "repae_step_s": med["repae"], "reference_step_s": med["reference"],
        "repae_min_s": min(times["repae"]), "repae_max_s": max(times["repae"]),
        "reference_min_s": min(times["reference"]), "reference_max_s": max(times["reference"]),
        "repae_times_s": times["repae"], "reference_times_s": times["reference"],
        "round_ratios": [a / b for a, b in zip(times["repae"], times["reference"])],
        "repae_cpu_s": statistics.median(cpu_times["repae"]), "reference_cpu_s": statistics.median(cpu_times["reference"]),
        "cpu_ratio": statistics.median(cpu_times["repae"]) / statistics.median(cpu_times["reference"]),
        "repae_cpu_times_s": cpu_times["repae"], "reference_cpu_times_s": cpu_times["reference"],
        "rounds": args.rounds, "warmup": args.warmup, "batch": batch, "lpips": not args.no_lpips,
        "compile": args.compile, "device": torch.cuda.get_device_name() if device.type == "cuda" else
        (platform.processor() or platform.machine()), "threads": torch.get_num_threads(),
        "precision": cfg["precision"], "config": args.config or ("headline" if device.type == "cuda" else "small"),
        "configuration": {k: v for k, v in cfg.items() if k not in ("batch",)},
        "torch": torch.__version__, "reference": str(root),
        "parameter_counts": {part: {"repae": a, "reference": b} for part, (a, b) in counts.items()},
        "parameter_count_problems": count_problems,
        "step0_repae": step0["repae"], "step0_reference": step0["reference"], "step0_abs_diff": diffs,
        "step0_max_loss_diff": max_loss_diff, "loss_tolerance": tol,
        "losses_match": max_loss_diff <= tol, "repae_overrides": ours.overrides,
    }
    code = 0 if (result["losses_match"] and not count_problems) else 1
    return result, code


def print_report(r: dict) -> None:
    print(f"REPA-E step, repae vs the official code ({r['reference']})")
    print(f"device {r['device']}, {r['threads']} thread(s), torch {r['torch']}, configuration {r['config']}, "
          f"batch {r['batch']}, {r['precision']}, LPIPS {'on' if r['lpips'] else 'off'}, compile {r['compile']}")
    print("\n| part | repae params | reference params |")
    print("|---|---|---|")
    for part, c in r["parameter_counts"].items():
        print(f"| {part} | {c['repae']:,} | {c['reference']:,} |")
    print("(repae's SiT pos_embed is a frozen buffer; the reference's is an nn.Parameter that its loop trains)")
    for problem in r["parameter_count_problems"]:
        print(f"MISMATCH {problem}")
    print("\n| step-0 value | repae | reference | abs diff |")
    print("|---|---|---|---|")
    for key, d in r["step0_abs_diff"].items():
        print(f"| {key} | {r['step0_repae'][key]:.6g} | {r['step0_reference'][key]:.6g} | {d:.2e} |")
    verdict = "ok" if r["losses_match"] else "EXCEEDS THE TOLERANCE"
    print(f"largest step-0 loss difference {r['step0_max_loss_diff']:.2e} (tolerance {r['loss_tolerance']:.0e}): "
          f"{verdict}")
    print("\n| side | median s/step | min | max | rounds |")
    print("|---|---|---|---|---|")
    for side in ("repae", "reference"):
        print(f"| {side} | {r[f'{side}_step_s']:.3f} | {r[f'{side}_min_s']:.3f} | {r[f'{side}_max_s']:.3f} | "
              f"{r['rounds']} |")
    rr = r["round_ratios"]
    print(f"\nratio repae / reference (medians): {r['ratio']:.3f}  (per round {min(rr):.2f}-{max(rr):.2f})")
    print(f"process CPU time per step, medians: repae {r['repae_cpu_s']:.3f} s, reference {r['reference_cpu_s']:.3f} s, "
          f"ratio {r['cpu_ratio']:.3f} (on a shared CPU less disturbed by other processes than the wall clock)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_reference(args.reference)  # before importing torch: a wrong path fails fast
        result, code = run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    if code:
        print("the two sides do not compute the same step (see above): the timings do not compare like with like",
              file=sys.stderr)
    return code


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
