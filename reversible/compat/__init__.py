"""Drop-in replacements for the per-project ``reversible.py`` files of lucidrains' repositories.

Each module exposes the same public names, constructors and call signatures as the original
file, so pointing the import at it is enough::

    # from h_transformer_1d.reversible import ReversibleSequence, SequentialSequence
    from reversible.compat.h_transformer_1d import ReversibleSequence, SequentialSequence

All of them run on :mod:`reversible.core` (in-place reconstruction, per-call RNG, autocast
replay, DDP-safe parameter gradients). Module hierarchies (``blocks.{i}.f.net...``) match the
originals, so their checkpoints load unchanged.

* :mod:`reversible.compat.h_transformer_1d` -- ``h_transformer_1d/reversible.py``
* :mod:`reversible.compat.axial_attention` -- ``axial_attention/reversible.py``
* :mod:`reversible.compat.se3_transformer` -- ``se3_transformer_pytorch/reversible.py``
* :mod:`reversible.compat.nuwa` -- ``nuwa_pytorch/reversible_video_audio.py`` and ``nuwa_pytorch/reversible.py``
"""
