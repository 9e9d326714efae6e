"""The optional packages of the trackers: checked without importing them (validation), imported when a run starts."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from repae import UserError

__all__ = ["check_installed", "import_package"]


def _message(tracker: str, module: str, extra: str, detail: str = "") -> str:
    because = f" ({detail})" if detail else ""
    return (f"the {tracker} tracker needs the {module} package, which is not installed{because}: "
            f"pip install 'repae[{extra}]' (or remove {tracker} from `trackers`)")


def check_installed(tracker: str, module: str, extra: str) -> None:
    """A :class:`repae.UserError` naming the extra to install when ``module`` cannot be imported; nothing is
    imported (the factory runs during ``repae recipe validate``)."""
    if module in sys.modules:
        if sys.modules[module] is None:  # import blocked (python -X importtime tricks, tests)
            raise UserError(_message(tracker, module, extra))
        return
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise UserError(_message(tracker, module, extra, str(exc))) from None
    if spec is None:
        raise UserError(_message(tracker, module, extra))


def import_package(tracker: str, module: str, extra: str, *, via: str | None = None) -> ModuleType:
    """``import module`` (or the module ``via`` that needs it: ``torch.utils.tensorboard``); an ``ImportError``
    (missing, or broken: a missing dependency of its own) becomes the same one-line :class:`repae.UserError`."""
    check_installed(tracker, module, extra)
    try:
        return importlib.import_module(via or module)
    except ImportError as exc:
        raise UserError(_message(tracker, module, extra, f"{type(exc).__name__}: {exc}")) from None
