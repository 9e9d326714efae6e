"""Inception-v3 features for FID, sFID, IS and precision/recall, through torch-fidelity's port of the 2015 TF graph.

The ADM evaluator (Dhariwal & Nichol, 2021, arXiv 2105.05233, ``evaluations/evaluator.py``) reads three tensors of
the TensorFlow Inception graph ``classify_image_graph_def.pb``:

- ``pool_3:0`` (2048-d): FID, precision/recall;
- ``mixed_6/conv:0`` sliced to its first 7 channels, 17x17x7 = 2023-d flattened in NHWC order: sFID;
- ``pool_3 @ W_logits`` (no bias, 1008 classes): Inception Score.

torch-fidelity (``inception-v3-compat``) ports that graph, including its TF1 bilinear resize to 299 and the
``(x - 128) / 128`` input scaling, and exposes ``2048`` and ``logits_unbiased``. The spatial ``mixed_6/conv`` tensor
is the output of ``Mixed_6d.branch1x1`` (conv, BatchNorm, ReLU) in that port; :class:`ADMInceptionV3` adds it as the
feature :data:`SPATIAL` and is registered with torch-fidelity as :data:`EXTRACTOR_NAME`, so
``torch_fidelity.calculate_metrics(feature_extractor="repae-inception-v3-adm", feature_layer_fid="mixed_6_conv")``
works too.

Weights are never fetched behind the user's back here: :func:`find_inception_weights`
(:mod:`repae.evaluate.inception_weights`, torch-free) resolves a local file (flag, environment variable, torch's hub
cache) and says where to put it when it is missing. They are read without
unpickling arbitrary objects (:func:`repae.weights.load_state_dict`), then checked key by key against the network.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # type: ignore[import-untyped]

from repae.errors import UserError

__all__ = [
    "ADMInceptionV3",
    "ENV_WEIGHTS",
    "EXTRACTOR_NAME",
    "FEATURE_LAYERS",
    "SPATIAL",
    "WEIGHTS_FILENAME",
    "WEIGHTS_URL",
    "extract_features",
    "find_inception_weights",
    "load_inception",
    "random_inception_state_dict",
]

EXTRACTOR_NAME = "repae-inception-v3-adm"
"""Name under which :class:`ADMInceptionV3` is registered with torch-fidelity."""
SPATIAL = "mixed_6_conv"
"""Feature name of the sFID features (TF ``mixed_6/conv``, first 7 channels, NHWC-flattened, 2023-d)."""
FEATURE_LAYERS = {"pool": "2048", "spatial": SPATIAL, "logits": "logits_unbiased"}
"""repae's feature names -> the extractor's feature names."""
SPATIAL_CHANNELS = 7

from repae.evaluate.inception_weights import (  # noqa: E402 - torch-free, re-exported here
    ENV_WEIGHTS,
    WEIGHTS_FILENAME,
    WEIGHTS_URL,
    find_inception_weights,
    missing_weights_message,
)


class ADMInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's Inception-v3 port plus the ADM sFID features (:data:`SPATIAL`).

    Construct it through torch-fidelity (``create_feature_extractor``) or :func:`load_inception`;
    ``feature_extractor_weights_path`` is required (a local file; safetensors or a tensors-only PyTorch file).
    """

    features_list: list[str]
    weights_sha256: str

    def __init__(
        self,
        name: str,
        features_list: Sequence[str],
        feature_extractor_weights_path: str | os.PathLike[str] | None = None,
        feature_extractor_internal_dtype: str | None = None,
        **kwargs,
    ) -> None:
        if feature_extractor_weights_path is None:
            raise UserError(missing_weights_message("no weights file was given"))
        from repae.weights import load_into, load_state_dict

        state, sha256 = load_state_dict(feature_extractor_weights_path)
        # torch-fidelity reads the file itself with an unrestricted pickle load; hand it an empty, trusted stand-in
        # and fill the (meta) network from the safely read state dict instead.
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        with torch.device("meta"):
            super().__init__(name, list(features_list), feature_extractor_weights_path=empty,
                             feature_extractor_internal_dtype=feature_extractor_internal_dtype, **kwargs)
        for key, value in self.state_dict().items():  # older conversions carry no BatchNorm step counters
            if key.endswith("num_batches_tracked") and key not in state:
                state[key] = torch.zeros((), dtype=value.dtype)
        load_into(self, state, assign=True, what=f"Inception weights from {feature_extractor_weights_path}")
        self.to(self.feature_extractor_internal_dtype)
        self.requires_grad_(False)
        self.eval()
        self.weights_sha256 = sha256

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        if not state_dict:  # the empty stand-in handed to torch-fidelity's constructor (see __init__)
            return None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL)

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``x``: uint8 ``[B, 3, H, W]``. Returns the requested features, in request order, as float32."""
        requested = list(self.features_list)
        if SPATIAL not in requested:
            return super().forward(x)
        captured: list[torch.Tensor] = []
        hook = self.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: captured.append(out))
        inner = [f for f in requested if f != SPATIAL] or ["768"]
        self.features_list = inner
        try:
            out = dict(zip(inner, super().forward(x)))
        finally:
            self.features_list = requested
            hook.remove()
        spatial = captured[0][:, :SPATIAL_CHANNELS]  # [B, 7, 17, 17]
        out[SPATIAL] = spatial.permute(0, 2, 3, 1).reshape(spatial.shape[0], -1).to(torch.float32)
        return tuple(out[f] for f in requested)


def _ensure_registered() -> None:
    from torch_fidelity import register_feature_extractor  # type: ignore[import-untyped]
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # type: ignore[import-untyped]

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, ADMInceptionV3)


_ensure_registered()


# -- building and running the network ------------------------------------------------------------------------------
def load_inception(
    weights: str | os.PathLike[str], features: Iterable[str] = ("pool", "spatial", "logits"), device: str = "cpu"
) -> ADMInceptionV3:
    """Build the registered extractor with the given weights file, returning repae's ``features`` (see
    :data:`FEATURE_LAYERS`) in that order, on ``device``."""
    from torch_fidelity.utils import create_feature_extractor  # type: ignore[import-untyped]

    layers = [FEATURE_LAYERS[f] for f in features]
    extractor = create_feature_extractor(
        EXTRACTOR_NAME, layers, cuda=False, feature_extractor_weights_path=str(weights), verbose=False
    )
    return extractor.to(device)


def extract_features(
    batches: Iterable[np.ndarray],
    extractor: ADMInceptionV3,
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``extractor`` over uint8 NHWC image batches; return repae's feature names -> float32 ``[N, D]`` arrays.

    TF32 is switched off for the duration (cuDNN uses it for convolutions by default on recent GPUs), so GPU features
    stay within float32 round-off of CPU ones.
    """
    names = {layer: name for name, layer in FEATURE_LAYERS.items()}
    wanted = [names[layer] for layer in extractor.features_list]
    device = next(extractor.parameters()).device
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            for batch in batches:
                x = torch.tensor(np.asarray(batch, dtype=np.uint8), device=device).permute(0, 3, 1, 2)
                for name, value in zip(wanted, extractor(x)):
                    chunks[name].append(value.float().cpu().numpy())
                if progress is not None:
                    progress(len(batch))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    return {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32) for name, parts in chunks.items()}


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the exact key layout of torch-fidelity's Inception (for tests and offline dry runs).

    Convolutions are He-initialised and BatchNorms are identities, so activations keep their scale through the
    network and the features are informative (unlike a default-initialised network, whose features vanish).
    """
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.device("meta"):
        skeleton = ADMInceptionV3.__new__(ADMInceptionV3)
        FeatureExtractorInceptionV3.__init__(skeleton, "skeleton", ["2048"], feature_extractor_weights_path=empty)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, meta in skeleton.state_dict().items():
        shape = tuple(meta.shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith(("bn.running_var", "bn.weight")):
            state[key] = torch.ones(shape)
        elif key.endswith(("bn.running_mean", "bn.bias", "fc.bias")):
            state[key] = torch.zeros(shape)
        else:  # conv / fc weights
            fan_in = int(np.prod(shape[1:]))
            std = (2.0 / fan_in) ** 0.5 if key.endswith("conv.weight") else fan_in ** -0.5
            state[key] = torch.randn(shape, generator=gen) * std
    return state
