"""Ready predictors: a model in, a class for ``map_batches`` out.

Each is a plain callable class, built once per actor on its worker::

    import daskinfer as di
    from daskinfer.predictors import HFEmbeddingPredictor

    ds.map_batches(
        HFEmbeddingPredictor,
        fn_constructor_kwargs={"model": "sentence-transformers/all-MiniLM-L6-v2",
                               "normalize": True, "max_tokens_per_batch": 8192},
        compute=di.ActorPoolStrategy(size=2),
        batch_size=256,
    )

Importing this package loads neither torch, transformers nor tensorflow; they are
imported in the predictors' ``__init__``, on the workers. See ``docs/models.md``.
"""

from __future__ import annotations

from daskinfer.predictors._hf import (
    HFEmbeddingPredictor,
    HFGenerationPredictor,
    HFTextClassificationPredictor,
)
from daskinfer.predictors._tf import TFPredictor
from daskinfer.predictors._tokens import TokenCounters, plan_sub_batches
from daskinfer.predictors._torch import StagedTensors, TorchPredictor

__all__ = [
    "HFEmbeddingPredictor",
    "HFGenerationPredictor",
    "HFTextClassificationPredictor",
    "StagedTensors",
    "TFPredictor",
    "TokenCounters",
    "TorchPredictor",
    "plan_sub_batches",
]
