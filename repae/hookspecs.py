"""Hook specifications of repae: the whole contract between repae and its plugins.

A plugin is a module (or object) with functions marked ``@repae.hookimpl`` whose names are the hooks below. It is
found through the ``repae`` entry-point group of an installed distribution::

    [project.entry-points.repae]
    my-plugin = "my_package.repae_plugin"

Built-in components are registered through this same mechanism. A hook implementation may accept fewer arguments than
the specification lists (pluggy's opt-in arguments), so new arguments never break existing plugins. Implementing a
hook that is not specified here (a misspelled name, say) makes the plugin fail to load.

Phases
------
*Registration* (every ``repae`` command, before anything else): :func:`register_components`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from repae.plugins import Register

hookspec = pluggy.HookspecMarker("repae")
hookimpl = pluggy.HookimplMarker("repae")
"""Marker for hook implementations; import it as ``from repae import hookimpl``."""

# ---------------------------------------------------------------------------------------------------------------------
# Registration hooks
# ---------------------------------------------------------------------------------------------------------------------


@hookspec
def register_components(register: Register) -> None:
    """Register the components this plugin provides.

    Call ``register`` once per component::

        @repae.hookimpl
        def register_components(register):
            register(
                "tokenizer", "my-vae",
                summary="a KL autoencoder with 8 latent channels",
                config=MyVAEConfig,                       # a dataclass; fields documented with repae.option
                factory="my_package.vae:build_my_vae",    # imported only when the component is built
                presets={"small": {"width": 64}},         # optional named field values, selected by the
            )                                             # config field `size` (see repae.registry)

    The factory is called as ``factory(config, context)`` with the validated config instance and a
    :class:`repae.BuildContext` (target device, whether to load weights, components built so far). What the built
    component must provide is the contract of its kind in :mod:`repae.interfaces`.

    :param register: callback with signature ``register(kind, name, *, summary, config, factory, presets=None)``.
        It raises ``repae.errors.PluginError`` for invalid input (an unknown kind, a name that is not lower-case words,
        a config field of an unsupported type, a default that is not of its field's type, presets without a ``size``
        field); the whole plugin is then reported as failed and none of its components is registered. A name another
        plugin already registered is not an error: the first plugin keeps the plain name, this one's component is
        reachable as ``DISTRIBUTION:NAME`` (see :mod:`repae.registry`).

    Use in plugins: registration must stay cheap. Keep torch and model imports out of the module that holds the
    hook implementation and name the factory by its import path, so that ``repae list`` stays fast.
    """
