"""Drop-in replacements for the AdaMerging code people already run, on this package's merged layers.

- :mod:`adamerge_fast.compat.fusion_bench`: FusionBench's ``LayerWiseMergedModel`` / ``TaskWiseMergedModel`` (same
  names, signatures, defaults, ``merge_weight`` orientation) and its module-level helpers.
- :mod:`adamerge_fast.compat.official`: the official repository's ``AdaMerging`` module (``lambdas()``,
  ``lambdas_raw``, ``collect_trainable_params()``, ...), :data:`~adamerge_fast.compat.official.OFFICIAL_STEP`
  (two batches per task per step, summed) and ``AdaMerging.from_checkpoints`` over the official pickled
  checkpoints, read without running their code (:mod:`adamerge_fast.safe_pickle`).

Neither imports FusionBench or the official repository. ``docs/dropin.md`` shows the lines a user changes.
"""

from . import fusion_bench, official

__all__ = ["fusion_bench", "official"]
