"""Optional packages of plugins (an extra such as ``repae[wandb]``): one message when one is missing (torch-free).

A component whose factory runs during ``repae recipe validate`` checks that its package is installed without
importing it (:func:`check_package`), so that a missing one is reported before anything is written; it imports the
package when it is really used (:func:`require_package`). Both raise the same :class:`repae.UserError`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

from repae.errors import UserError

__all__ = ["check_package", "missing_package_message", "require_package"]


def missing_package_message(module: str, *, extra: str, what: str, instead: str | None = None,
                            detail: str = "", distribution: str = "repae") -> str:
    """``"{what} needs the {module} package, which is not installed ({detail}): pip install
    '{distribution}[{extra}]' (or {instead})"``."""
    because = f" ({detail})" if detail else ""
    otherwise = f" (or {instead})" if instead else ""
    return (f"{what} needs the {module} package, which is not installed{because}: pip install "
            f"'{distribution}[{extra}]'{otherwise}")


def check_package(module: str, *, extra: str, what: str, instead: str | None = None,
                  distribution: str = "repae") -> None:
    """Raise the :class:`repae.UserError` of :func:`missing_package_message` when ``module`` cannot be found;
    imports nothing (``importlib.util.find_spec``). ``what``: what needs it ("the wandb tracker"); ``extra``: the
    extra of ``distribution`` (repae, or a plugin's own distribution) that installs it; ``instead``: the other way
    out ("remove wandb from `trackers`")."""
    def missing(detail: str = "") -> UserError:
        return UserError(missing_package_message(module, extra=extra, what=what, instead=instead, detail=detail,
                                                 distribution=distribution))

    if module in sys.modules:
        if sys.modules[module] is None:  # import blocked (tests, python -X tricks)
            raise missing()
        return
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        raise missing(str(exc)) from None
    if spec is None:
        raise missing()


def require_package(module: str, *, extra: str, what: str, instead: str | None = None,
                    via: str | None = None, distribution: str = "repae") -> ModuleType:
    """``import module`` (or the module ``via`` that needs it, e.g. ``torch.utils.tensorboard`` for
    ``tensorboard``) and return it; a missing package, or one that fails to import (a missing dependency of its own),
    is the :class:`repae.UserError` of :func:`check_package`, with the import error as detail."""
    check_package(module, extra=extra, what=what, instead=instead, distribution=distribution)
    try:
        return importlib.import_module(via or module)
    except ImportError as exc:
        raise UserError(missing_package_message(module, extra=extra, what=what, instead=instead,
                                                distribution=distribution,
                                                detail=f"{type(exc).__name__}: {exc}")) from None
