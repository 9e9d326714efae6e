"""Tests of the frozen representation encoders ``dinov2``, ``clip`` and ``ijepa``: registration, tiny forwards,
REPA's preprocessing, freezing, weight loading in the real checkpoint layouts (from generated files, never
downloaded), the offline messages, and full-size builds on the meta device against timm / open_clip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import repae
from conftest import build_section
from repae.errors import RecipeError, UserError
from repae.weights import file_sha256
from repae_encoders import CLIP_PRESETS, DINOV2_PRESETS, IJEPA_PRESETS, OFFICIAL_WEIGHTS
from repae_encoders.common import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

PRESETS = {"dinov2": DINOV2_PRESETS, "clip": CLIP_PRESETS, "ijepa": IJEPA_PRESETS}
CONFIGS = {"dinov2": "DINOv2Config", "clip": "CLIPConfig", "ijepa": "IJEPAConfig"}
TINY = [("dinov2", "tiny"), ("dinov2", "tiny-reg"), ("clip", "tiny"), ("ijepa", "tiny")]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build(registry, name: str, device: str = "cpu", **section):
    """Build encoder ``name`` from a recipe section the way the core does (presets applied, under the device)."""
    return build_section(registry, "encoder", name, device, **section)


def raw_images(batch: int = 2, size: int | tuple[int, int] = 64, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def put_in_hub_cache(cache: Path, repo: str, filename: str, source: Path) -> Path:
    """Lay a file out as huggingface_hub's cache does (refs/main -> snapshots/<commit>/<file>)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(COMMIT)
    target = folder / "snapshots" / COMMIT / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)
    return target


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return cache


# -- registration ------------------------------------------------------------------------------------------------------
def test_registered_lazily(registry):
    for name, presets in PRESETS.items():
        entry = registry.get("encoder", name)
        assert dict(entry.presets) == presets and isinstance(entry.factory, str)
        assert entry.default_preset() in presets  # selected by the one preset field, `size`
    assert set(DINOV2_PRESETS) == {f"{v}{r}" for v in ("vit-s14", "vit-b14", "vit-l14", "vit-g14", "tiny")
                                   for r in ("", "-reg")}
    code = "import sys, repae_encoders; print(sorted({'torch', 'timm', 'open_clip'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_config_problems(registry):
    entry = registry.get("encoder", "dinov2")
    _, issues = entry.parse({"size": "vit-b16"})
    assert issues and issues[0].path == "size" and "vit-b14" in issues[0].hint
    _, issues = entry.parse({"size": "tiny", "embed_dim": 30, "num_heads": 4})
    assert issues and "divisible" in issues[0].message
    config, issues = entry.parse({"size": "tiny", "depth": 3})
    assert not issues and config.depth == 3 and config.embed_dim == 32  # explicit keys win over the preset
    _, issues = entry.parse({"variant": "tiny"})  # the old selector name points to the new one
    assert issues and "size: tiny" in issues[0].hint
    with pytest.raises(RecipeError, match="mine"):
        repae.create("encoder", "dinov2", size="mine", device="meta", registry=registry)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_defaults_are_the_default_preset(registry, name):
    """Encoder configs have concrete defaults (no null architecture fields): those of their default size."""
    import repae_encoders

    config = getattr(repae_encoders, CONFIGS[name])()
    preset = PRESETS[name][config.size]
    assert {k: getattr(config, k) for k in preset} == preset
    assert registry.get("encoder", name).default_preset() == config.size


# -- tiny forward, shapes, frozen ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", TINY)
def test_tiny_forward_shapes(registry, name, size):
    enc = build(registry, name, size=size)
    assert enc.embed_dim == 32 and enc.loaded_weights == {}
    for resolution in (32, 64, 256):
        out = enc(raw_images(2, resolution))
        assert out.shape == (2, enc.num_tokens(resolution), enc.embed_dim)
        assert torch.isfinite(out).all()
    assert enc.num_tokens(256) == 256 and enc.num_tokens(512) == 1024  # REPA: 16x16 at 256, 32x32 at 512
    assert enc(raw_images(1, (64, 96))).shape == (1, 4 * 6, 32)
    # registers / CLS are dropped: the output holds exactly the patch tokens
    with pytest.raises(ValueError, match="uint8"):
        enc(raw_images(1, 64).float())


@pytest.mark.parametrize("name,size", TINY)
def test_frozen_and_always_eval(registry, name, size):
    enc = build(registry, name, size=size)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.training
    parent = nn.ModuleDict({"encoder": enc, "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in enc.modules())
    out = enc(raw_images(1, 32))
    assert not out.requires_grad and out.grad_fn is None


def test_batch_independent_and_deterministic(registry):
    enc = build(registry, "dinov2", size="tiny")
    imgs = raw_images(3, 64)
    full = enc(imgs)
    assert torch.allclose(enc(imgs[1:2]), full[1:2], atol=1e-6)
    assert torch.equal(enc(imgs), full)


# -- REPA's preprocessing ------------------------------------------------------------------------------------------------
def reference_preprocess(images: torch.Tensor, mean, std, normalize_first: bool) -> torch.Tensor:
    """REPA's ``preprocess_raw_image`` written out: /255, normalise, bicubic resize to 224 * (res // 256)
    (F.interpolate defaults: align_corners False, no antialias); CLIP resizes before normalising."""
    res = images.shape[-1]
    x = images.float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    if normalize_first:
        x = (x - m) / s
    x = F.interpolate(x, size=224 * (res // 256), mode="bicubic", align_corners=False, antialias=False)
    if not normalize_first:
        x = (x - m) / s
    return x


@pytest.mark.parametrize(
    "name,mean,std,normalize_first",
    [
        ("dinov2", IMAGENET_MEAN, IMAGENET_STD, True),
        ("ijepa", IMAGENET_MEAN, IMAGENET_STD, True),
        ("clip", CLIP_MEAN, CLIP_STD, False),
    ],
)
def test_preprocessing_matches_repa(registry, name, mean, std, normalize_first):
    assert mean == ((0.485, 0.456, 0.406) if name != "clip" else (0.48145466, 0.4578275, 0.40821073))
    assert std == ((0.229, 0.224, 0.225) if name != "clip" else (0.26862954, 0.26130258, 0.27577711))
    enc = build(registry, name, size="tiny")
    for res in (256, 512):
        imgs = raw_images(2, res)
        got = enc.preprocess(imgs)
        want = reference_preprocess(imgs, mean, std, normalize_first)
        assert got.shape == (2, 3, 224 * res // 256, 224 * res // 256) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the test can tell antialiasing apart: it changes the result well above the tolerance
    aa = F.interpolate(imgs.float() / 255, size=448, mode="bicubic", antialias=True)
    plain = F.interpolate(imgs.float() / 255, size=448, mode="bicubic", antialias=False)
    assert (aa - plain).abs().max() > 1e-2


def test_normalisation_constants_are_buffers_outside_the_state_dict(registry, monkeypatch):
    """The mean/std are built once as buffers and move with the module; a forward call builds no tensor from them."""
    enc = build(registry, "dinov2", size="tiny")
    assert enc.pixel_mean.flatten().tolist() == pytest.approx(IMAGENET_MEAN)
    assert enc.pixel_std.flatten().tolist() == pytest.approx(IMAGENET_STD)
    assert not any(k.startswith("pixel_") for k in enc.state_dict())
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    enc.preprocess(raw_images(1, 32))
    assert made == []


# -- weights: DINOv2 in timm's layout, official route through the hub cache ---------------------------------------------
@pytest.fixture(scope="module")
def dinov2_vits14_file(tmp_path_factory):
    """A ViT-S/14 DINOv2 checkpoint in timm's own key layout (as on hf://timm/...), random values."""
    import timm

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True)
    randomize(model)
    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model.eval()


def test_dinov2_loads_timm_layout_strictly(registry, dinov2_vits14_file):
    path, model = dinov2_vits14_file
    enc = build(registry, "dinov2", size="vit-s14", weights=str(path))
    info = enc.loaded_weights["weights"]
    assert (info.sha256, info.source, info.path, info.entry) == (file_sha256(path), str(path), str(path), None)
    saved = load_file(str(path))
    state = enc.backbone.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert all(p.device.type == "cpu" and not p.requires_grad for p in enc.parameters())
    # tokens = timm's forward_features on REPA's input, prefix dropped (position embedding resampled 37x37 -> 16x16)
    imgs = raw_images(1, 256)
    with torch.no_grad():
        want = model.forward_features(reference_preprocess(imgs, IMAGENET_MEAN, IMAGENET_STD, True))
    torch.testing.assert_close(enc(imgs), want[:, 1:], atol=1e-5, rtol=1e-5)


def test_dinov2_official_weights_from_offline_cache(registry, dinov2_vits14_file, offline_hub):
    path, _ = dinov2_vits14_file
    source, _ = OFFICIAL_WEIGHTS["dinov2"]["vit-s14"]
    assert source == "hf://timm/vit_small_patch14_dinov2.lvd142m/model.safetensors"
    put_in_hub_cache(offline_hub, "timm/vit_small_patch14_dinov2.lvd142m", "model.safetensors", path)
    enc = build(registry, "dinov2", size="vit-s14")  # weights: null -> the official file, offline from the cache
    info = enc.loaded_weights["weights"]
    assert info.source == source and info.sha256 == file_sha256(path)


@pytest.mark.parametrize(
    "name,size,repo,filename",
    [
        ("dinov2", "vit-b14", "timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors"),
        ("dinov2", "vit-l14-reg", "timm/vit_large_patch14_reg4_dinov2.lvd142m", "model.safetensors"),
        ("clip", "vit-l14", "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors"),
    ],
)
def test_official_weights_not_cached_message(registry, offline_hub, name, size, repo, filename):
    with pytest.raises(UserError) as info:
        build(registry, name, size=size)
    msg = str(info.value)
    assert f"hf://{repo}/{filename}" in msg and str(offline_hub) in msg
    assert f"hf download {repo} {filename}" in msg and f"set encoder.weights=/path/to/{filename}" in msg


def test_ijepa_official_weights_not_cached_message(registry, offline_hub):
    with pytest.raises(UserError) as info:
        build(registry, "ijepa", size="vit-h14")
    msg = str(info.value)
    assert "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar" in msg
    assert str(offline_hub.parent / "torch-home" / "hub" / "checkpoints") in msg and "encoder.weights" in msg


def test_dinov2_meta_release_layout_with_registers(registry, tmp_path):
    """Meta's torch.hub layout (mask_token, register_tokens, CLS position inside pos_embed) loads and gives the same
    tokens as timm's layout of the same weights."""
    enc = build(registry, "dinov2", size="tiny-reg")
    randomize(enc)
    timm_state = {k: v.clone() for k, v in enc.backbone.state_dict().items()}
    save_file(timm_state, str(tmp_path / "timm.safetensors"))
    cls_pos = torch.randn(1, 1, 32)
    meta_state = {k: v for k, v in timm_state.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    meta_state.update(
        register_tokens=timm_state["reg_token"],
        cls_token=timm_state["cls_token"] - cls_pos,
        pos_embed=torch.cat([cls_pos, timm_state["pos_embed"]], dim=1),
        mask_token=torch.zeros(1, 32),
    )
    torch.save(meta_state, tmp_path / "dinov2_tiny_reg4_pretrain.pth")
    a = build(registry, "dinov2", size="tiny-reg", weights=str(tmp_path / "timm.safetensors"))
    b = build(registry, "dinov2", size="tiny-reg", weights=str(tmp_path / "dinov2_tiny_reg4_pretrain.pth"))
    imgs = raw_images(2, 64)
    torch.testing.assert_close(a(imgs), b(imgs), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a(imgs), enc(imgs), atol=1e-6, rtol=1e-6)


def test_mismatched_weights_name_the_keys(registry, tmp_path):
    enc = build(registry, "dinov2", size="tiny-reg")
    save_file(enc.backbone.state_dict(), str(tmp_path / "reg.safetensors"))
    with pytest.raises(UserError) as info:
        build(registry, "dinov2", size="tiny", depth=1, weights=str(tmp_path / "reg.safetensors"))
    msg = str(info.value)
    assert "dinov2 tiny weights from" in msg and str(tmp_path / "reg.safetensors") in msg
    assert "pos_embed: file [1, 16, 32] vs model [1, 17, 32]" in msg  # registers: no CLS position in the file
    assert "15 unexpected key(s)" in msg and "blocks.1.attn.qkv.weight" in msg and "(5 more)" in msg


# -- weights: CLIP and I-JEPA in their release layouts -------------------------------------------------------------------
def test_clip_loads_open_clip_layout(registry, tmp_path):
    """A whole open_clip CLIP state dict (visual.* + text tower) loads strictly into the vision tower; the tokens are
    open_clip's last-block tokens before ln_post, class token dropped."""
    import open_clip

    clip = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg={"image_size": 56, "layers": 2, "width": 32, "patch_size": 14, "head_width": 16},
        text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
        quick_gelu=True,
    )
    randomize(clip)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    enc = build(registry, "clip", size="tiny", weights=str(path))
    assert enc.loaded_weights["weights"].sha256 == file_sha256(path)
    visual = clip.visual.eval()
    for k, v in visual.state_dict().items():
        assert torch.equal(enc.backbone.state_dict()[k], v), k
    imgs = raw_images(2, 64)  # 64 px -> 56 px input, the trained 4x4 grid
    x = enc.preprocess(imgs)
    with torch.no_grad():
        want = visual.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(enc(imgs), want["image_intermediates"][0], atol=1e-5, rtol=1e-5)
    assert enc(raw_images(1, 128)).shape == (1, 64, 32)  # position embedding resampled to 8x8


def test_ijepa_loads_release_checkpoint(registry, tmp_path):
    """Meta's I-JEPA release: a .pth.tar with encoder / predictor / target_encoder entries, DDP ``module.`` keys."""
    enc = build(registry, "ijepa", size="tiny")
    randomize(enc)
    encoder = {"module." + k: v.clone() for k, v in enc.backbone.state_dict().items()}
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save({"encoder": encoder, "target_encoder": encoder, "predictor": {"module.x": torch.zeros(1)},
                "epoch": 300}, path)
    with pytest.raises(UserError) as info:
        build(registry, "ijepa", size="tiny", weights=str(path))
    assert "'encoder'" in str(info.value) and "'predictor'" in str(info.value) and "weights_key" in str(info.value)
    loaded = build(registry, "ijepa", size="tiny", weights=str(path), weights_key="encoder")
    imgs = raw_images(2, 64)
    torch.testing.assert_close(loaded(imgs), enc(imgs), atol=1e-6, rtol=1e-6)
    info = loaded.loaded_weights["weights"]
    assert info.sha256 == file_sha256(path) and info.entry == "encoder"


def test_random_weights_option(registry):
    enc = build(registry, "dinov2", size="tiny", weights="random")
    assert enc.loaded_weights == {}


# -- full size on meta -----------------------------------------------------------------------------------------------------
FULL = [
    ("dinov2", "vit-s14", 22_056_192, "vit_small_patch14_dinov2"),
    ("dinov2", "vit-b14", 86_579_712, "vit_base_patch14_dinov2"),
    ("dinov2", "vit-l14", 304_367_616, "vit_large_patch14_dinov2"),
    ("dinov2", "vit-g14", 1_136_479_232, "vit_giant_patch14_dinov2"),
    ("dinov2", "vit-s14-reg", 22_057_344, "vit_small_patch14_reg4_dinov2"),
    ("dinov2", "vit-b14-reg", 86_582_016, "vit_base_patch14_reg4_dinov2"),
    ("dinov2", "vit-l14-reg", 304_370_688, "vit_large_patch14_reg4_dinov2"),
    ("dinov2", "vit-g14-reg", 1_136_483_840, "vit_giant_patch14_reg4_dinov2"),
    ("clip", "vit-l14", 303_966_208, "ViT-L-14"),
    ("ijepa", "vit-h14", 630_762_240, "vit_huge_patch14_gap_224"),
    ("ijepa", "vit-h14-in22k", 630_762_240, "vit_huge_patch14_gap_224"),
]


def reference_on_meta(name: str, model_name: str) -> nn.Module:
    """The library's own model, built on meta: timm's registered ViT, or open_clip's CLIP vision tower."""
    with torch.device("meta"):
        if name == "clip":
            import open_clip

            cfg = open_clip.get_model_config(model_name)
            return open_clip.model.CLIP(**cfg, quick_gelu=True).visual
        import timm

        return timm.create_model(model_name, pretrained=False, num_classes=0)


@pytest.mark.parametrize("name,size,count,model_name", FULL, ids=[f"{n}-{v}" for n, v, *_ in FULL])
def test_full_size_on_meta(registry, name, size, count, model_name):
    # a weights path that does not exist proves that a meta build never touches weights
    enc = build(registry, name, device="meta", size=size, weights="/nonexistent/weights.safetensors")
    assert all(p.is_meta for p in enc.parameters())
    assert sum(p.numel() for p in enc.parameters()) == count
    assert enc.embed_dim == PRESETS[name][size]["embed_dim"] and enc.num_tokens(256) == 256
    assert enc.loaded_weights == {}
    ref = reference_on_meta(name, model_name)
    mine = {k: tuple(v.shape) for k, v in enc.backbone.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert mine == theirs


# -- weights and configuration agree (issue 11): num_heads changes no shape ------------------------------------------


@pytest.mark.parametrize(("name", "section", "field", "expected"), [
    ("dinov2", {"size": "vit-b14", "num_heads": 6}, "num_heads", "num_heads 6 (the weights: 12)"),
    ("dinov2", {"size": "vit-b14", "weights": "hf://timm/vit_large_patch14_dinov2.lvd142m"}, "embed_dim",
     "embed_dim 768 (the weights: 1024)"),
    ("dinov2", {"size": "vit-g14-reg", "mlp": "gelu"}, "mlp", "mlp gelu (the weights: swiglu)"),
    ("clip", {"size": "vit-l14", "num_heads": 8}, "num_heads", "num_heads 8 (the weights: 16)"),
    ("ijepa", {"size": "vit-h14", "num_heads": 20}, "num_heads", "num_heads 20 (the weights: 16)"),
])
def test_release_weights_are_checked_by_the_config(registry, name, section, field, expected):
    """``weights: null`` loads the size's release (or ``weights`` names one): every architecture field must be the
    release's, reported at the key path with the preset to use."""
    _, issues = registry.get("encoder", name).parse(section)
    assert [i.path for i in issues] == [field], issues
    assert expected in issues[0].message and "size: " in issues[0].message


def test_configs_of_releases_and_of_random_weights_pass(registry):
    for name, section in (("dinov2", {"size": "vit-b14"}), ("dinov2", {"size": "tiny", "num_heads": 1}),
                          ("dinov2", {"size": "vit-b14", "num_heads": 6, "weights": "random"}),
                          ("clip", {"size": "vit-l14", "token_stride": 8}), ("ijepa", {"size": "vit-h14-in22k"})):
        _, issues = registry.get("encoder", name).parse(section)
        assert not issues, (name, section, issues)


def test_release_layout_with_other_num_heads_is_refused(registry, tmp_path):
    """A local file in the DINOv2 ViT-S/14 layout (random weights) into a config with 3 heads: refused when loaded
    (before the tensors are taken) and on meta from the safetensors header, naming the field, both values and the
    preset; the release's own config loads it."""
    source = build(registry, "dinov2", size="vit-s14", weights="random")
    state = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    file = tmp_path / "dinov2-s.safetensors"
    save_file(state, str(file))
    for device in ("cpu", "meta"):
        with pytest.raises(UserError, match=r"(?s)num_heads 3 \(the weights: 6\).*no parameter shape.*vit-s14"):
            build(registry, "dinov2", device=device, size="vit-s14", num_heads=3, weights=str(file))
    loaded = build(registry, "dinov2", size="vit-s14", weights=str(file))
    assert torch.equal(loaded.backbone.blocks[0].attn.qkv.weight, source.backbone.blocks[0].attn.qkv.weight)
