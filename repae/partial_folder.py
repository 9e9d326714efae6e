"""Resumable folder writers: the ``<out>.partial/`` protocol shared by latent caches and image shards.

A writer (:func:`repae.latent_cache.write_latent_cache`, :func:`repae.image_shards.write_image_shards`) writes its
files into ``<out>.partial/`` and renames that folder to ``<out>`` once complete. While it is unfinished,
``header.json`` inside it holds the output's identity (the index keys of :attr:`FolderFormat.identity`, e.g. the
dataset and tokenizer), so that a rerun of the same command resumes and a different one is refused; a finished
``<out>`` is recognised by the same keys of its index file (``index.json``, ``manifest.json``). Any other existing
``<out>`` or ``<out>.partial`` is never overwritten.

:meth:`FolderFormat.open` is the opening sequence (``<out>`` already complete? ``<out>.partial`` of the same output?
stale temporaries removed), :meth:`FolderFormat.finish` the closing one (index written, the folder renamed). Each
file inside is written atomically (:mod:`repae.fileio`). Torch-free.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from repae.errors import UserError
from repae.fileio import write_json

__all__ = ["HEADER_FILE", "FolderFormat", "differences", "partial_dir", "plain", "repae_version"]

HEADER_FILE = "header.json"
"""Inside ``<out>.partial/``: the identity of the output being written."""


def partial_dir(out_dir: Path) -> Path:
    """``<out_dir>.partial``: where the output is written until it is complete."""
    return out_dir.with_name(out_dir.name + ".partial")


def plain(data: Any) -> Any:
    """JSON-normalised data (tuples become lists, paths strings, keys sorted), so that identities compare equal after
    a round trip."""
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``"differs in dataset.resolution, num_items"``: the keys whose values differ, one level deep."""
    keys: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys.extend(f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        else:
            keys.append(key)
    return "differs in " + ", ".join(keys)


def repae_version() -> str:
    """The installed repae's version (recorded in every index)."""
    from repae import __version__

    return __version__


@dataclasses.dataclass(frozen=True)
class FolderFormat:
    """A kind of output folder written through ``<out>.partial/``, and the words of its error messages.

    ``format`` is the index's ``"format"`` value, ``index_file`` its name, ``identity`` the index keys that identify
    an output. ``different`` names a finished different output (``"a different latent cache"``), ``unfinished`` an
    unfinished one (``"an unfinished cache of another dataset or tokenizer"``), ``pronoun`` refers to it (``"it"``,
    ``"them"``).
    """

    format: str
    index_file: str
    identity: tuple[str, ...]
    different: str
    unfinished: str
    pronoun: str = "it"

    def existing_identity(self, out_dir: Path) -> dict[str, Any] | None:
        """The identity recorded in ``out_dir``'s index file, or ``None`` if it holds no index of this format."""
        try:
            index = json.loads((out_dir / self.index_file).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(index, dict) or index.get("format") != self.format:
            return None
        return plain({k: index.get(k) for k in self.identity})

    def open(self, out_dir: Path, header: Mapping[str, Any]) -> Path | None:
        """Start or resume writing the output identified by ``header`` (already :func:`plain`) to ``out_dir``.

        Returns ``None`` when ``out_dir`` already holds this very output (written by an identical run); else the
        partial folder to write into: created with ``header.json``, or an interrupted run's with the same header,
        with the temporaries of writes interrupted half-way removed. Raises :class:`UserError` if ``out_dir`` exists
        holding anything else, or ``<out_dir>.partial`` an unfinished different output.
        """
        partial = partial_dir(out_dir)
        if out_dir.exists():
            existing = self.existing_identity(out_dir)
            if existing == header:
                return None
            what = f"{self.different} ({differences(existing, header)})" if existing else "other files"
            raise UserError(f"{out_dir} already holds {what}; refusing to overwrite it. Choose another --out, or "
                            f"delete {out_dir} if it may go.")
        if partial.exists():
            try:
                previous = json.loads((partial / HEADER_FILE).read_text())
            except (OSError, ValueError):
                previous = None
            if previous != header:
                what = f"({differences(previous, header)})" if isinstance(previous, dict) else "(or something else)"
                raise UserError(f"{partial} holds {self.unfinished} {what}; refusing to overwrite {self.pronoun}. "
                                f"Delete {partial} or choose another --out.")
        else:
            partial.mkdir(parents=True)
            write_json(partial / HEADER_FILE, header)

        for stale in partial.glob(".*.tmp-*"):  # a write interrupted half-way
            stale.unlink()
        return partial

    def finish(self, partial: Path, out_dir: Path, index: Mapping[str, Any], *,
               leftovers: Iterable[Path] = ()) -> Path:
        """Complete the output: write ``index`` (with ``created`` and ``repae_version`` added) to the index file,
        delete ``leftovers`` (files only the writer needed) and ``header.json``, rename ``partial`` to ``out_dir``;
        returns ``out_dir``."""
        write_json(partial / self.index_file, {
            **index,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "repae_version": repae_version(),
        })
        for path in leftovers:
            path.unlink()
        (partial / HEADER_FILE).unlink()
        os.replace(partial, out_dir)
        return out_dir
