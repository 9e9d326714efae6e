"""Finding and reading weight files, safely.

A *weights source* is the string a component's ``weights`` option holds:

- a local file, or a folder (``default_filename`` inside it, or the only weights file it holds); ``~`` is expanded;
- ``hf://org/repo/path/in/repo[@revision]`` (or ``hf://org/repo`` when the component names a default file): resolved
  through the Hugging Face hub cache with :func:`huggingface_hub.hf_hub_download`. With ``HF_HUB_OFFLINE=1`` a cached
  file is used without any network access; a file that is not cached raises :class:`~repae.errors.UserError` naming
  the file, the repository and where to put it;
- ``https://...``: downloaded once into torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where timm keeps the same
  files), for checkpoints that are published only as URLs. ``HF_HUB_OFFLINE=1`` forbids the download here too.

**Offline.** When downloads are not forbidden but the hub (or a URL's host) cannot be reached, that is found once
per process with one short request (:func:`reachable`) and the rest of the command works as with
``HF_HUB_OFFLINE=1``: cached files are used, and a missing one is one short message, without huggingface_hub's
connection errors and retries. Every message about missing weights is one sentence of what is missing, then one
``fix:`` line, and names the recipe key to change (``tokenizer.weights``, ``encoders.0.weights``,
``losses.gan.weights``): the core records which component is being built (:func:`repae.build.current_build`), so a
plugin's factory that calls :func:`resolve_weights` or :func:`load_weights` gets its key named too. The key is
``<label>.<option>``: ``option`` when the caller passes it (``option="vgg_weights"``), else the config field whose
value is the source, else ``weights``.

Reading never runs arbitrary pickles: safetensors first; other files only through
``torch.load(map_location="cpu", weights_only=True)``, with the harmless classes official checkpoints hold
(:data:`SAFE_PICKLE_GLOBALS`, such as the ``argparse.Namespace`` of their training arguments) allowed. A file that
needs anything else is refused with a message naming it; ``REPAE_TRUST_PICKLE=1`` (or ``--trust-pickle`` on the
commands that read weights) is the one explicit way to load a pickle you trust with a full unpickler.

:func:`check_state_dict` is the one checker of every load (recipe weights through :func:`load_into`, checkpoints,
``repae sample``/``analyze``/``export``): it names the file, the part, the first mismatching keys with both shapes and
the fix. :func:`write_weights_record` records the source, resolved revision and sha256 of every file the components
loaded in a run directory's ``weights.json``.

Importing this module does not import torch or huggingface_hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from repae.errors import UserError, WeightsMismatchError, first_line

if TYPE_CHECKING:
    from torch import Tensor, nn

    from repae.interfaces import WeightsInfo

__all__ = [
    "SAFE_PICKLE_GLOBALS",
    "TRUST_PICKLE_ENV",
    "WEIGHTS_FILE",
    "WEIGHT_SUFFIXES",
    "LoadReport",
    "DownloadError",
    "check_state_dict",
    "local_weights",
    "describe_file",
    "file_sha256",
    "hub_cache_dir",
    "hub_endpoint",
    "hub_revision",
    "load_into",
    "load_state_dict",
    "load_weights",
    "read_checkpoint",
    "select_entry",
    "offline",
    "torch_hub_dir",
    "parse_hf_source",
    "reachable",
    "resolve_weights",
    "trust_pickle",
    "weights_record",
    "weights_key",
    "write_weights_record",
]

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".tar")
"""File endings recognised as weights when a source names a folder."""

_TRUE = {"1", "true", "yes", "on"}

TRUST_PICKLE_ENV = "REPAE_TRUST_PICKLE"
"""Environment variable: ``1`` loads weights files that need arbitrary pickled objects with a full unpickler (which
can run any code the file carries). Off by default; ``--trust-pickle`` on ``repae run/sample/analyze/export`` sets it."""

SAFE_PICKLE_GLOBALS: tuple[str, ...] = ("argparse.Namespace",)
"""Classes allowed inside ``.pt``/``.pth`` files read with ``torch.load(weights_only=True)``, beyond torch's own
(tensors, containers, numbers): the training arguments official DiT/SiT/REPA/REPA-E checkpoints store (``args``). They
carry data only; rebuilding them runs no code of the file's choosing."""

WEIGHTS_FILE = "weights.json"
"""The file of a run directory that records every weights file its components loaded (:func:`write_weights_record`)."""


def trust_pickle() -> bool:
    """Whether ``REPAE_TRUST_PICKLE`` allows full (code-executing) unpickling, read at call time."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in _TRUE


# -- where the files are -------------------------------------------------------------------------------------------
def offline() -> bool:
    """Whether downloads are forbidden (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


_REACHABLE: dict[str, bool] = {}
PROBE_TIMEOUT_S = 3.0
"""How long :func:`reachable` waits for a host's answer."""


def reachable(url: str) -> bool:
    """Whether the host of ``url`` answers an HTTP request (any status; proxies of the environment honoured), asked
    once per host and process with a :data:`PROBE_TIMEOUT_S` timeout. An unreachable hub is then treated as
    ``HF_HUB_OFFLINE=1`` for the rest of the command (no retries, no back-off)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    origin = f"{parts.scheme or 'https'}://{parts.netloc}/"
    if origin not in _REACHABLE:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(urllib.request.Request(origin, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
            answered = True
        except urllib.error.HTTPError:  # the host answered (404, 405, ...): it is reachable
            answered = True
        except Exception:  # noqa: BLE001 - DNS, refused, timeout, TLS, proxy: not reachable from here
            answered = False
        _REACHABLE[origin] = answered
    return _REACHABLE[origin]


def hub_endpoint() -> str:
    """The Hugging Face hub's address (``HF_ENDPOINT``, default ``https://huggingface.co``)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def torch_hub_dir() -> Path:
    """torch's hub folder (``torch.hub.get_dir()``: ``$TORCH_HOME/hub``), without importing torch when it is not
    loaded yet."""
    import sys

    if "torch" in sys.modules:
        import torch.hub

        return Path(torch.hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "torch")
    return Path(home).expanduser() / "hub"


def weights_key(source: str, option: str | None = None) -> str | None:
    """The recipe key of the weights being resolved (``tokenizer.weights``) while a component is built
    (:func:`repae.build.current_build`): ``<label>.<option>``, ``option`` defaulting to the config field that holds
    ``source``, else ``weights`` when the config has that field; ``None`` outside a build."""
    import dataclasses

    from repae.build import current_build

    building = current_build()
    if building is None:
        return None
    label, config = building
    if option is None and dataclasses.is_dataclass(config):
        names = [f.name for f in dataclasses.fields(config)]
        holding = [n for n in names if isinstance(getattr(config, n, None), str) and getattr(config, n) == source]
        option = holding[0] if len(holding) == 1 else ("weights" if "weights" in names else None)
    return f"{label}.{option}" if option else label


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")


def hub_revision(path: str | os.PathLike[str]) -> str | None:
    """The commit a file of the Hugging Face hub cache belongs to (``.../models--org--name/snapshots/<commit>/...``),
    ``None`` for a file outside the cache."""
    parts = Path(path).parts
    for i in range(len(parts) - 2):
        if parts[i].startswith(("models--", "datasets--", "spaces--")) and parts[i + 1] == "snapshots" \
                and _SNAPSHOT.match(parts[i + 2]):
            return parts[i + 2]
    return None


@dataclass(frozen=True)
class HfSource:
    """A parsed ``hf://org/repo[/path][@revision]`` source."""

    repo_id: str
    filename: str | None
    revision: str | None

    def __str__(self) -> str:
        path = f"/{self.filename}" if self.filename else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo_id}{path}{rev}"


def parse_hf_source(source: str) -> HfSource:
    """Split ``hf://org/repo/path/in/repo@revision`` into repository, file and revision."""
    rest = source[len("hf://") :].strip("/")
    revision = None
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        revision = revision or None
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise UserError(
            f"weights source {source!r} does not name a Hugging Face repository: write hf://org/repo/file "
            "(for example hf://timm/vit_base_patch14_dinov2.lvd142m/model.safetensors)"
        )
    return HfSource(f"{parts[0]}/{parts[1]}", "/".join(parts[2:]) or None, revision)


def resolve_weights(source: str | os.PathLike[str], *, default_filename: str | None = None,
                    option: str | None = None) -> Path:
    """Turn a weights source into the path of a local file.

    ``source`` is a local file or folder, ``hf://org/repo[/path/in/repo][@revision]`` or an ``https://`` URL (see the
    module docstring). ``default_filename`` is the file to take inside a folder or a bare ``hf://org/repo``.
    ``option`` is the config field the source comes from, for messages (default: the field holding it, else
    ``weights``; see :func:`weights_key`). Raises :class:`~repae.errors.UserError` with the fix when the file is
    missing or cannot be fetched.
    """
    text = os.fspath(source).strip()
    key = weights_key(text, option)
    if not text:
        raise UserError("empty weights source: give a local path, hf://org/repo/file or an https:// URL")
    if text.startswith("hf://"):
        return _resolve_hf(parse_hf_source(text), default_filename, key)
    if text.startswith(("https://", "http://")):
        return _resolve_url(text, key)
    return _resolve_local(Path(text).expanduser(), default_filename, text, key)


def local_weights(source: str | os.PathLike[str] | None, *, default_filename: str | None = None) -> Path | None:
    """The local file a weights source names, found without downloading anything (for checks on ``meta``: ``repae
    recipe validate``, ``--dry-run``): :func:`resolve_weights` of a local file or folder, ``None`` for an empty,
    ``hf://`` or URL source and for one that does not resolve (a missing file is reported by the recipe check)."""
    text = os.fspath(source).strip() if source is not None else ""
    if not text or text.startswith(("hf://", "https://", "http://")):
        return None
    try:
        return resolve_weights(text, default_filename=default_filename)
    except (UserError, OSError, ValueError):
        return None


def _set(key: str | None, example: str) -> str:
    """The last words of a fix: ``set tokenizer.weights=/path/to/x.pt`` (or the option, outside a recipe)."""
    return f"set {key}={example}" if key else f"set this weights option to {example}"


def _resolve_local(path: Path, default_filename: str | None, given: str, key: str | None = None) -> Path:
    where = f"{key}: " if key else ""
    if path.is_file():
        return path
    if path.is_dir():
        if default_filename and (path / default_filename).is_file():
            return path / default_filename
        found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        if len(found) == 1:
            return found[0]
        wanted = f" (looked for {default_filename!r})" if default_filename else ""
        if not found:
            raise UserError(f"{where}weights folder {path} holds no weights file{wanted}; give the path of the file "
                            "itself")
        names = ", ".join(p.name for p in found[:10])
        raise UserError(f"{where}weights folder {path} holds several weights files ({names}){wanted}; name the file")
    raise UserError(
        f"{where}weights file not found: {given!r} (resolved to {path.resolve()}). Give an existing local file or "
        "folder, or hf://org/repo/file to use the Hugging Face hub cache."
    )


def _resolve_hf(src: HfSource, default_filename: str | None, key: str | None = None) -> Path:
    filename = src.filename or default_filename
    if not filename:
        raise UserError(f"weights source {src} names no file: write hf://{src.repo_id}/<file in the repo>")
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency of timm
        raise UserError(f"{src} needs the huggingface_hub package: pip install huggingface_hub") from exc

    cache = hub_cache_dir()
    full = HfSource(src.repo_id, filename, src.revision)
    where = f"{key}: " if key else ""
    endpoint = hub_endpoint()
    if offline():
        reason: str | None = "downloads are off (HF_HUB_OFFLINE=1)"
    elif not reachable(endpoint):  # once per process: then offline, without huggingface_hub's retries
        reason = f"{endpoint.split('://', 1)[-1]} cannot be reached"
    else:
        reason = None
    try:
        path = hf_hub_download(
            src.repo_id, filename, revision=src.revision, cache_dir=str(cache), local_files_only=reason is not None
        )
    except hf_errors.LocalEntryNotFoundError:
        rev = f" --revision {src.revision}" if src.revision else ""
        raise UserError(
            f"{where}{full} is not in the Hugging Face cache, and {reason or 'the hub could not be reached'}."
            f"\n  fix: run `hf download {src.repo_id} {filename}{rev}` where the hub is reachable and copy its cache "
            f"to {cache}, or {_set(key, '/path/to/' + Path(filename).name)}"
        ) from None
    except hf_errors.RepositoryNotFoundError as exc:
        raise UserError(
            f"{where}Hugging Face repository {src.repo_id!r} not found or not accessible (private or gated "
            f"repositories need `hf auth login`): {first_line(exc)}"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{where}revision {src.revision!r} does not exist in Hugging Face repository "
                        f"{src.repo_id!r}") from None
    except hf_errors.EntryNotFoundError:
        raise UserError(f"{where}{full} does not exist; check the file name in the repository") from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise UserError(f"{where}could not fetch {full}: {first_line(exc)}") from None
    return Path(path)


class DownloadError(UserError):
    """A URL's file could not be fetched; :attr:`reason` says why in a few words (for callers' own messages)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _resolve_url(url: str, key: str | None = None) -> Path:
    from urllib.parse import urlparse

    name = Path(urlparse(url).path).name
    if not name:
        raise UserError(f"weights URL {url!r} does not end in a file name")
    folder = torch_hub_dir() / "checkpoints"
    target = folder / name
    if target.is_file():
        return target
    where = f"{key}: " if key else ""
    fix = f"\n  fix: download {url} into {folder}/, or {_set(key, '/path/to/' + name)}"
    if offline():
        reason = "downloads are off (HF_HUB_OFFLINE=1)"
    elif not reachable(url):
        reason = f"{urlparse(url).netloc} cannot be reached"
    else:
        import torch.hub

        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), progress=True)
            return target
        except Exception as exc:  # noqa: BLE001 - any network failure becomes the same user-facing message
            reason = f"its download failed ({first_line(exc)})"
    raise DownloadError(f"{where}{name} is not in torch's cache, and {reason}.{fix}", reason)


# -- what the files hold --------------------------------------------------------------------------------------------
_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (remembered per path, size and mtime within the process)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < size < path.stat().st_size


def load_state_dict(
    path: str | os.PathLike[str], *, key: str | None = None, missing_key: str = "error"
) -> tuple[dict[str, Tensor], str]:
    """Read a state dict from ``path``; return it with the sha256 of the file.

    safetensors files are read directly; anything else through ``torch.load(weights_only=True)`` (a file that needs
    arbitrary pickled objects is refused with an explanation). When the file holds a checkpoint rather than a bare
    state dict, ``key`` picks the entry (``model``, ``ema``, ``state_dict``, ...); for a flat file it selects the keys
    under ``key.`` and strips that prefix. Without ``key`` a checkpoint with exactly one state dict inside is
    unwrapped; several raise an error listing them. See :func:`select_entry` for ``missing_key``.
    """
    obj, digest = read_checkpoint(path)
    state, _ = select_entry(obj, key, path, missing_key=missing_key)
    return state, digest


def load_weights(
    source: str,
    *,
    key: str | None = None,
    missing_key: str = "error",
    default_filename: str | None = None,
    option: str | None = None,
) -> tuple[dict[str, Tensor], WeightsInfo]:
    """Resolve a weights ``source`` (:func:`resolve_weights`; ``option``: the config field it comes from, for
    messages), read it safely and pick entry ``key`` (:func:`select_entry`); return the state dict and the
    :class:`~repae.interfaces.WeightsInfo` a component records in its ``loaded_weights``
    (:class:`~repae.interfaces.RecordsWeights`)."""
    from repae.interfaces import WeightsInfo

    named = {"option": option} if option is not None else {}  # a stand-in resolve_weights (tests) may not take it
    path = resolve_weights(source, default_filename=default_filename, **named)
    obj, digest = read_checkpoint(path)
    state, entry = select_entry(obj, key, path, missing_key=missing_key)
    return state, WeightsInfo(source=str(source), path=str(path), sha256=digest, entry=entry,
                              revision=hub_revision(path))


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Read a weights file as is (safetensors, or ``torch.load(weights_only=True)``); return it and its sha256."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file not found: {p}")
    digest = file_sha256(p)
    if _is_safetensors(p):
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu"), digest
        except Exception as exc:  # noqa: BLE001 - corrupt or truncated file
            raise UserError(f"could not read safetensors file {p}: {first_line(exc)}") from None
    return _torch_load(p), digest


def select_entry(
    obj: Any, key: str | None, path: str | os.PathLike[str], *, missing_key: str = "error"
) -> tuple[dict[str, Tensor], str | None]:
    """Pick the state dict ``key`` out of what :func:`read_checkpoint` returned; return it and the entry used.

    ``missing_key="whole"`` reads a flat state dict that has no ``key.`` entries whole (entry ``None``) instead of
    raising: for options like "the ``ema`` entry of a training checkpoint, or the file itself for a release".
    """
    if missing_key not in ("error", "whole"):
        raise ValueError(f"missing_key must be 'error' or 'whole', not {missing_key!r}")
    return _select(obj, key, Path(path), whole_if_flat=missing_key == "whole")


def _allowed_globals() -> list[Any]:
    import importlib

    found = []
    for name in SAFE_PICKLE_GLOBALS:
        module, _, attr = name.rpartition(".")
        found.append(getattr(importlib.import_module(module), attr))
    return found


def _torch_load(path: Path) -> Any:
    import pickle
    import warnings

    import torch

    if trust_pickle():
        warnings.warn(f"{TRUST_PICKLE_ENV}=1: reading {path} with a full unpickler (it may run code it carries)",
                      stacklevel=3)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - not a torch file, truncated download...
            raise UserError(f"could not read {path} as safetensors or a PyTorch checkpoint: {first_line(exc)}") from None
    try:
        with torch.serialization.safe_globals(_allowed_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's note, not the user's
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        reason = _torch_reason(text) or first_line(exc)
        pickled = describe_file(path) in ("a Python pickle", "a PyTorch checkpoint (a zip of pickled objects)")
        if found or "blocked" in text.lower() or (pickled and "unsupported" in text.lower()):
            what = f" ({found.group(1)})" if found else f" ({reason})"
            raise UserError(
                f"refusing to load {path}: it is a Python pickle holding more than tensors and plain data{what}; "
                "rebuilding it needs a full unpickler, which can run arbitrary code the file carries. If you trust "
                f"where it came from, set {TRUST_PICKLE_ENV}=1 (or pass --trust-pickle) to read it with a full "
                "unpickler; better, convert it once to safetensors and use that file."
            ) from None
        raise UserError(f"could not read {path} as safetensors or a PyTorch checkpoint ({reason})") from None
    except Exception as exc:  # noqa: BLE001 - not a torch file, TorchScript archive, truncated download...
        if "torchscript" in str(exc).lower():
            raise UserError(
                f"{path} is a TorchScript archive, not a state dict; use the safetensors or state-dict release of "
                "these weights instead"
            ) from None
        raise UserError(f"could not read {path} as safetensors or a PyTorch checkpoint: {first_line(exc)}") from None


def _torch_reason(text: str) -> str:
    """The informative line of a ``torch.load`` error, without torch's advice to pass ``weights_only=False``."""
    noise = ("weights only load failed", "weights_only", "check the documentation", "please file an issue")
    for line in text.splitlines():
        line = line.split("WeightsUnpickler error:", 1)[-1].strip()
        if line and not any(n in line.lower() for n in noise):
            return line
    return ""


def describe_file(path: str | os.PathLike[str]) -> str:
    """What a file holds, judged from its first bytes: ``"a safetensors file"``, ``"a PyTorch checkpoint (a zip of
    pickled objects)"``, ``"a Python pickle"``, ``"an empty file"`` or ``"a file"`` (for messages)."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return "an unreadable file"
    if not head:
        return "an empty file"
    if _is_safetensors(p):
        return "a safetensors file"
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (a zip of pickled objects)"
    if head[:1] == b"\x80":
        return "a Python pickle"
    return "a file"


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(_is_tensor(v) for v in obj.values())


def _entries(obj: Mapping[str, Any]) -> str:
    def describe(v: Any) -> str:
        if _is_state_dict(v):
            return f"state dict, {len(v)} tensors"
        if isinstance(v, Mapping):
            return f"mapping, {len(v)} entries"
        return type(v).__name__

    shown = [f"{k!r} ({describe(v)})" for k, v in list(obj.items())[:12]]
    more = f" and {len(obj) - 12} more" if len(obj) > 12 else ""
    return ", ".join(shown) + more


def _select(obj: Any, key: str | None, path: Path, *, whole_if_flat: bool = False) -> tuple[dict[str, Tensor], str | None]:
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if key is None:
        if _is_state_dict(obj):
            return {str(k): v for k, v in obj.items()}, None
        inner = [k for k, v in obj.items() if _is_state_dict(v)]
        if len(inner) == 1:
            return {str(k): v for k, v in obj[inner[0]].items()}, str(inner[0])
        raise UserError(
            f"{path} holds a checkpoint, not a bare state dict; choose the entry to load (the component's "
            f"weights_key option). Entries: {_entries(obj)}"
        )
    if key in obj and isinstance(obj[key], Mapping):
        state, _ = _select(obj[key], None, path)
        return state, key
    prefix = key + "."
    sub = {str(k)[len(prefix) :]: v for k, v in obj.items() if str(k).startswith(prefix) and _is_tensor(v)}
    if sub:
        return sub, key
    if _is_state_dict(obj) and whole_if_flat:
        return {str(k): v for k, v in obj.items()}, None
    if _is_state_dict(obj):
        heads = sorted({str(k).split(".", 1)[0] for k in obj})
        listing = ", ".join(repr(h) for h in heads[:12]) + (f" and {len(heads) - 12} more" if len(heads) > 12 else "")
        raise UserError(
            f"{path} has no entry {key!r}: it is a flat state dict (key prefixes: {listing}); set weights_key to one "
            "of those prefixes, or to null to load the whole file"
        )
    raise UserError(f"{path} has no entry {key!r}. Entries: {_entries(obj)}")


# -- putting tensors into a module -----------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """Keys left out of a non-strict load."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _listing(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


Hints = Callable[[list[str], list[str], dict[str, tuple[tuple[int, ...], tuple[int, ...]]]], list[str]]
"""``hints(missing, unexpected, mismatched) -> lines``: a component's advice on which config field to change."""


Shapes = Mapping[str, Any]
"""What a state dict is checked against: a module, or ``{key: tensor or shape}``."""


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", value)
    return tuple(int(d) for d in shape)


def check_state_dict(
    expected: nn.Module | Shapes,
    state_dict: Mapping[str, Any],
    *,
    what: str,
    strict: bool = True,
    hints: Hints | None = None,
    fix: str | None = None,
    model: str | None = None,
) -> LoadReport:
    """The one check of every load: ``state_dict`` against ``expected`` (a module, or its ``{key: tensor or
    shape}``).

    Raises :class:`~repae.errors.WeightsMismatchError` whose first line names ``what`` (the file and the part:
    ``"runs/x/checkpoints/step-0000400/model-denoiser.safetensors: the denoiser weights"``), the model and the first
    problem (a key with both shapes), followed by the first ten missing keys, unexpected keys and shape mismatches
    (with their counts), the component's ``hints`` and the ``fix``. Missing and unexpected keys are tolerated (and
    returned) when ``strict`` is false; shape mismatches never are.
    """
    if isinstance(expected, Mapping):
        shapes = {str(k): _shape(v) for k, v in expected.items()}
        model = model or "model"
    else:
        shapes = {str(k): _shape(v) for k, v in expected.state_dict().items()}
        model = model or type(expected).__name__
    missing = sorted(k for k in shapes if k not in state_dict)
    unexpected = sorted(str(k) for k in state_dict if k not in shapes)
    mismatched = {
        k: (_shape(state_dict[k]), shapes[k]) for k in sorted(shapes)
        if k in state_dict and _shape(state_dict[k]) != shapes[k]
    }
    problems, first = [], []
    if mismatched:
        k, (got, want) = next(iter(mismatched.items()))
        first.append(f"{k} is {list(got)} in the file, {list(want)} in the {model}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s) (in the model, not in the file): {_listing(missing)}")
        first.append(f"{missing[0]} is missing from the file")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (in the file, not in the model): {_listing(unexpected)}")
        first.append(f"{unexpected[0]} is not in the {model}")
    if mismatched:
        listed = [f"{k}: file {list(got)} vs model {list(want)}" for k, (got, want) in mismatched.items()]
        problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(listed)}")
    if problems:
        advice = hints(missing, unexpected, mismatched) if hints else []
        if not advice and not fix:
            advice = [("check that the variant/size matches the checkpoint (and weights_key, for a checkpoint with "
                       "several entries)")]
        raise WeightsMismatchError(
            f"{what} do not fit the {model} built from the config ({first[0]}):\n  - "
            + "\n  - ".join(problems)
            + "".join(f"\n  hint: {line}" for line in advice)
            + (f"\n  fix: {fix}" if fix else "")
        )
    return LoadReport(missing, unexpected)


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    strict: bool = True,
    what: str = "weights",
    assign: bool = False,
    hints: Hints | None = None,
    fix: str | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``module`` after checking keys and shapes (:func:`check_state_dict`).

    Raises :class:`~repae.errors.WeightsMismatchError` naming the first ten missing keys, unexpected keys and shape
    mismatches (with their counts), followed by the component's ``hints`` (and the ``fix``); missing and unexpected
    keys are tolerated (and reported) when ``strict`` is false, shape mismatches never are. ``what`` names the weights
    in messages (``"dinov2 vit-b14 weights from <file>"``). ``assign=True`` adopts the given tensors (cast to the
    module's dtypes) instead of copying into existing ones: use it to fill a module built on the ``meta`` device.
    """
    expected = module.state_dict()
    check_state_dict(expected, state_dict, what=what, strict=strict, hints=hints, fix=fix,
                     model=type(module).__name__)
    tensors = dict(state_dict)
    if assign:
        for k, v in tensors.items():
            target = expected.get(k)
            if target is not None and v.is_floating_point() and v.dtype != target.dtype:
                tensors[k] = v.to(target.dtype)
    result = module.load_state_dict(tensors, strict=strict, assign=assign)
    return LoadReport(list(result.missing_keys), list(result.unexpected_keys))


# -- provenance -----------------------------------------------------------------------------------------------------
def weights_record(built: Any) -> list[dict[str, Any]]:
    """One entry per weights file the built components loaded (:class:`~repae.interfaces.RecordsWeights`): the
    component (label, kind, name, plugin), the role (``weights``, ``latent_stats``, ...), the configured source, the
    file read, its Hugging Face revision (``None`` outside the hub cache), sha256, size and the entry loaded.

    ``built`` is what :func:`repae.build.build_recipe` returns (objects with ``label``, ``entry`` and ``component``)
    or a mapping ``{label: component}``."""
    from repae.interfaces import RecordsWeights, supports

    items = built.items() if isinstance(built, Mapping) else [(getattr(b, "label", "?"), b) for b in built]
    out: list[dict[str, Any]] = []
    for label, one in items:
        component = getattr(one, "component", one)
        entry = getattr(one, "entry", None)
        if not supports(component, RecordsWeights):
            continue
        for role, info in sorted(component.loaded_weights.items()):
            path = Path(info.path)
            out.append({
                "component": str(label),
                "kind": getattr(entry, "kind", None),
                "name": getattr(entry, "name", None),
                "plugin": getattr(getattr(entry, "plugin", None), "label", None),
                "role": role,
                "source": info.source,
                "path": str(path.absolute()),  # the hub cache's snapshot path, not the blob it links to
                "revision": getattr(info, "revision", None) or hub_revision(path),
                "sha256": info.sha256,
                "bytes": path.stat().st_size if path.is_file() else None,
                "entry": info.entry,
            })
    return out


def write_weights_record(run_dir: str | os.PathLike[str], built: Any) -> Path:
    """Write :func:`weights_record` of ``built`` to ``RUN/weights.json`` (atomically); return its path. An empty list
    when no component loaded a file (random initialisation)."""
    from repae.fileio import atomic_write, holds, json_text

    path = Path(run_dir) / WEIGHTS_FILE
    record = {"files": weights_record(built)}
    text = json_text(record)
    if holds(path, text):
        return path  # the same files as before: nothing to write (a resume on a full disk needs no space)
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old is not None:  # a resumed run loads other files than it started with: keep the history, say so
            n = 1
            while (path.parent / f"weights.previous-{n}.json").exists():
                n += 1
            path.rename(path.parent / f"weights.previous-{n}.json")
            before = {(f.get("component"), f.get("role")): f.get("sha256") for f in old.get("files", [])}
            changed = [f"{f.get('component')} ({f.get('role')})" for f in record["files"]
                       if before.get((f.get("component"), f.get("role"))) not in (None, f.get("sha256"))]
            import warnings

            warnings.warn(f"{run_dir}: the weights loaded differ from the last start's "
                          f"({', '.join(changed) or 'files added or removed'}); the old record is kept as "
                          f"weights.previous-{n}.json", stacklevel=2)
    return atomic_write(path, text)
