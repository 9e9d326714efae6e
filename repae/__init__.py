"""repae: latent diffusion transformers with representation alignment (REPA-E, REPA, vanilla), from plugins and
YAML recipes.

The public API for plugin authors is small:

- :data:`hookimpl` marks hook implementations (see :mod:`repae.hookspecs` for the hooks);
- :func:`option` declares a documented config field;
- :func:`load_plugins` discovers installed plugins and returns a host with the component registry.

Importing :mod:`repae` does not import torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from repae.config import option
from repae.hookspecs import hookimpl
from repae.plugins import load_plugins

try:
    __version__ = version("repae")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl", "load_plugins", "option"]
