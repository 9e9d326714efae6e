"""Run directories: the resolved recipe and the versions of everything that produced a run.

``DIR/recipe.yaml``   the fully resolved recipe (byte-identical for the same recipe, overrides and plugin versions);
``DIR/versions.json`` repae, Python and the plugins (distribution and version) providing the recipe's components.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from repae.errors import UserError
from repae.fileio import atomic_write, write_json
from repae.recipe import diff_keys

__all__ = ["RECIPE_FILE", "VERSIONS_FILE", "prepare_run_dir", "versions"]

RECIPE_FILE = "recipe.yaml"
VERSIONS_FILE = "versions.json"


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
            atomic_write(run_dir / f"recipe.previous-{n}.yaml", old_text)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(existing, text)
    write_json(run_dir / VERSIONS_FILE, versions(resolved.plugins))
    return run_dir
