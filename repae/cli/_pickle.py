"""``--trust-pickle``: the one explicit opt-in to read weights files that need a full (code-executing) unpickler.

The option sets ``REPAE_TRUST_PICKLE=1`` (:data:`repae.weights.TRUST_PICKLE_ENV`, the single switch
:func:`repae.weights.trust_pickle` reads) for the duration of the command, so that processes it starts (DataLoader
workers) see it too; the previous value is restored afterwards. Setting the variable yourself is the same thing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import typer

TRUST_PICKLE_OPTION = typer.Option(
    False, "--trust-pickle", help="Read weights files that hold pickled Python objects with a full unpickler, which "
    "can run code the file carries: only for files you trust (same as REPAE_TRUST_PICKLE=1). Off: such files are "
    "refused; tensors and plain data (and argparse.Namespace) load without it.",
)


@contextlib.contextmanager
def pickle_trust(trust: bool) -> Iterator[None]:
    """Within the block, ``REPAE_TRUST_PICKLE=1`` when ``trust`` (else the environment is left as it is)."""
    from repae.weights import TRUST_PICKLE_ENV

    if not trust:
        yield
        return
    before = os.environ.get(TRUST_PICKLE_ENV)
    os.environ[TRUST_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_PICKLE_ENV, None)
        else:
            os.environ[TRUST_PICKLE_ENV] = before
