"""Drop-in replacements for the per-project ``reversible.py`` files of lucidrains' repositories.

Each module exposes the same public names, constructors and call signatures as the original
file, so pointing the import at it is enough::

    # from h_transformer_1d.reversible import ReversibleSequence, SequentialSequence
    from reversible.compat.h_transformer_1d import ReversibleSequence, SequentialSequence

or, for a package you do not edit, ``reversible.compat.install("h_transformer_1d")`` before
``import h_transformer_1d``.

All of them run on :mod:`reversible.core` (in-place reconstruction, per-call RNG, autocast
replay, DDP-safe parameter gradients). Module hierarchies (``blocks.{i}.f.net...``) match the
originals, so their checkpoints load unchanged.

* :mod:`reversible.compat.h_transformer_1d` -- ``h_transformer_1d/reversible.py``
* :mod:`reversible.compat.axial_attention` -- ``axial_attention/reversible.py``
* :mod:`reversible.compat.se3_transformer` -- ``se3_transformer_pytorch/reversible.py``
* :mod:`reversible.compat.nuwa` -- ``nuwa_pytorch/reversible_video_audio.py`` and ``nuwa_pytorch/reversible.py``
"""
from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["install", "TARGETS"]

#: compat module -> the module paths of the original packages it stands in for
TARGETS: dict[str, tuple[str, ...]] = {
    "h_transformer_1d": ("h_transformer_1d.reversible",),
    "axial_attention": ("axial_attention.reversible",),
    "se3_transformer": ("se3_transformer_pytorch.reversible",),
    "nuwa": ("nuwa_pytorch.reversible", "nuwa_pytorch.reversible_video_audio"),
}


def install(*names: str) -> None:
    """Make the original packages import these compat modules instead of their own ``reversible.py``.

    Call it before the package is imported, e.g. ``reversible.compat.install("h_transformer_1d")``
    then ``import h_transformer_1d``. With no names, installs all four. A package already imported
    keeps the classes it bound; a warning says so.
    """
    for name in names or tuple(TARGETS):
        if name not in TARGETS:
            raise ValueError(f"unknown compat module {name!r}; expected one of {list(TARGETS)}")
        module = importlib.import_module(f"{__name__}.{name}")
        for target in TARGETS[name]:
            if target in sys.modules and sys.modules[target] is not module:
                warnings.warn(f"{target} was already imported; code that imported names from it keeps them. "
                              f"Call reversible.compat.install({name!r}) before importing the package.",
                              stacklevel=2)
            sys.modules[target] = module
