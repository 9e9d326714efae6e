"""Where the Inception weights of ``repae eval`` (and ``repae analyze``'s rFID) come from; torch-free.

Weights are never fetched behind the user's back by ``analyze``; ``eval`` downloads :data:`WEIGHTS_URL` into torch's
hub cache when the host can be reached and downloads are not off. Every failure is one sentence of what is missing and
one ``fix:`` line (:func:`missing_weights_message`).
"""

from __future__ import annotations

import os
from pathlib import Path

from repae.errors import UserError

__all__ = ["ALTERNATIVE_FILENAMES", "ENV_WEIGHTS", "WEIGHTS_FILENAME", "WEIGHTS_URL", "check_inception_weights",
           "find_inception_weights", "missing_weights_message"]

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's conversion of the 2015 TF Inception graph (the file ``inception-v3-compat`` downloads)."""
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILENAME}"
ALTERNATIVE_FILENAMES = ("pt_inception-2015-12-05-6726825d.pth",)
"""pytorch-fid's conversion of the same graph; used from the cache when present and when its keys fit."""
ENV_WEIGHTS = "REPAE_INCEPTION_WEIGHTS"


def _cache_dir() -> Path:
    from repae.weights import torch_hub_dir

    return torch_hub_dir() / "checkpoints"


def missing_weights_message(reason: str) -> str:
    """``the Inception weights are missing: <reason>.`` and the one fix: the URL to
    download into torch's hub cache (named once), or ``--inception-weights FILE``."""
    return (f"the Inception weights are missing: {reason}.\n"
            f"  fix: download {WEIGHTS_URL} into {_cache_dir()}/, or pass --inception-weights FILE")


def _given(explicit: str | os.PathLike[str] | None) -> tuple[str, str] | None:
    """``(source, where it was given)``: ``--inception-weights``, else ``$REPAE_INCEPTION_WEIGHTS``, else ``None``."""
    if explicit is not None and str(explicit).strip():
        return os.fspath(explicit), "--inception-weights"
    source = os.environ.get(ENV_WEIGHTS)
    return (source, ENV_WEIGHTS) if source is not None and source.strip() else None


def check_inception_weights(explicit: str | os.PathLike[str] | None = None) -> None:
    """Refuse a local weights path given by ``--inception-weights`` (``explicit``) or ``$REPAE_INCEPTION_WEIGHTS``
    that does not exist, without reading anything (``repae eval`` calls it before torch is imported)."""
    given = _given(explicit)
    if given is not None:
        text, origin = given
        if "://" not in text and not Path(text).expanduser().exists():
            raise UserError(missing_weights_message(f"{origin} names {text}, which does not exist"))


def find_inception_weights(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The Inception weights file to use.

    In order: ``explicit`` (a local path, ``hf://`` or ``https://`` source), the ``REPAE_INCEPTION_WEIGHTS``
    environment variable, :data:`WEIGHTS_FILENAME` (or pytorch-fid's file of the same graph) in torch's hub cache
    (where torch-fidelity keeps it), and finally a download of :data:`WEIGHTS_URL` into that cache unless downloads
    are off (``HF_HUB_OFFLINE=1``) or github.com cannot be reached. Raises :class:`~repae.errors.UserError` naming
    what is missing and the fix.
    """
    from repae.weights import DownloadError, offline, reachable, resolve_weights

    check_inception_weights(explicit)
    given = _given(explicit)
    if given is not None:
        return resolve_weights(given[0], default_filename=WEIGHTS_FILENAME)
    cache = _cache_dir()
    for name in (WEIGHTS_FILENAME, *ALTERNATIVE_FILENAMES):
        if (cache / name).is_file():
            return cache / name
    if offline():
        raise UserError(missing_weights_message("not in torch's cache, and downloads are off (HF_HUB_OFFLINE=1)"))
    if not reachable(WEIGHTS_URL):
        raise UserError(missing_weights_message("not in torch's cache, and github.com cannot be reached"))
    try:
        return resolve_weights(WEIGHTS_URL)
    except DownloadError as exc:
        raise UserError(missing_weights_message(f"not in torch's cache, and {exc.reason}")) from None
