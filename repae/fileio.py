"""Atomic writes: a file or folder appears under its final name only once complete.

One mechanism for every file repae writes that a reader may meet half-written (recipes, JSON indexes, PNG samples,
``samples.npz``, latent-cache shards, checkpoints, exported weights): write to a temporary sibling, then ``os.replace`` it over the final
name (atomic on POSIX within one file system). A failure removes the temporary and leaves any previous version intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "holds", "write_json", "write_png", "write_safetensors"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file, or a folder the caller creates); on success it replaces
    ``path`` (an existing folder there is removed first), on an exception it is deleted.

    The temporary is ``.<name>.tmp-<pid>`` in the same folder (hidden; never matched by readers of the final names).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and tmp.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def holds(path: str | os.PathLike[str], text: str) -> bool:
    """Whether the file ``path`` already holds exactly ``text`` (UTF-8): a rewrite can be skipped (a resume on a full
    disk then needs no space)."""
    path = Path(path)
    return path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text


def json_text(data: Any, *, indent: int = 2, sort_keys: bool = False) -> str:
    """What :func:`write_json` writes for ``data``."""
    return json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n"


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    """``data`` as JSON (``indent`` spaces, a final newline) to ``path``, atomically."""
    return atomic_write(path, json_text(data, indent=indent, sort_keys=sort_keys))


def write_png(image: Any, path: str | os.PathLike[str]) -> Path:
    """A uint8 RGB image, a ``[3, H, W]`` tensor, to ``path`` as PNG, atomically; returns ``path``."""
    from PIL import Image

    array = image.permute(1, 2, 0).contiguous().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # uint8 [H, W, 3]: RGB
    return Path(path)


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Any], *,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """``tensors`` (name -> tensor) as a safetensors file at ``path``, atomically; returns ``path``. Each tensor is
    detached, moved to the CPU, made contiguous and copied (safetensors refuses tensors that share storage)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)
