"""Run directories: the resolved recipe and the versions of everything that produced a run.

``DIR/recipe.yaml``   the fully resolved recipe (byte-identical for the same recipe, overrides and plugin versions);
``DIR/versions.json`` repae, Python and the plugins (distribution and version) providing the recipe's components.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from repae.errors import UserError

__all__ = ["RECIPE_FILE", "VERSIONS_FILE", "diff_keys", "prepare_run_dir", "versions", "write_atomic"]

RECIPE_FILE = "recipe.yaml"
VERSIONS_FILE = "versions.json"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    if isinstance(data, list):
        out = {}
        for i, value in enumerate(data):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out or {prefix.rstrip("."): []}
    return {prefix.rstrip("."): data}


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted key paths whose values differ between two recipes (added and removed keys included)."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, object()) != b.get(k, object()))


def versions(plugins: Mapping[str, Any]) -> dict[str, Any]:
    """Versions of repae, Python, torch, timm, open_clip and the given plugins (name -> PluginInfo)."""
    from repae import __version__

    info: dict[str, Any] = {
        "repae": __version__,
        "python": platform.python_version(),
    }
    for dist in ("torch", "timm", "open-clip-torch"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info["plugins"] = {
        name: {"distribution": p.distribution, "version": p.version} for name, p in sorted(plugins.items())
    }
    return info


def prepare_run_dir(resolved: Any, run_dir: Path, *, allow_recipe_change: bool = False) -> Path:
    """Create ``run_dir`` and write the resolved recipe and versions.

    A directory that already holds a *different* recipe is refused (naming the keys that differ), so that nothing a
    previous run wrote is mixed with another configuration. With ``allow_recipe_change`` the old recipe is kept as
    ``recipe.previous-N.yaml`` and the new one written.
    """
    run_dir = Path(run_dir)
    text = resolved.to_yaml()
    existing = run_dir / RECIPE_FILE
    if existing.is_file():
        old_text = existing.read_text(encoding="utf-8")
        if old_text != text:
            try:
                changed = diff_keys(yaml.safe_load(old_text) or {}, yaml.safe_load(text) or {})
            except yaml.YAMLError:
                changed = ["(unreadable recipe.yaml)"]
            shown = ", ".join(changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
            if not allow_recipe_change:
                raise UserError(
                    f"{run_dir} already holds a run of a different recipe (differing keys: {shown}). Pass another "
                    f"--out directory, or --allow-recipe-change to continue it with the new recipe."
                )
            n = 1
            while (run_dir / f"recipe.previous-{n}.yaml").exists():
                n += 1
            (run_dir / f"recipe.previous-{n}.yaml").write_text(old_text, encoding="utf-8")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(existing, text)
    write_atomic(run_dir / VERSIONS_FILE, json.dumps(versions(resolved.plugins), indent=2) + "\n")
    return run_dir
