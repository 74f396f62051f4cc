"""BD and the baselines of Table I, behind one registry: ``create_model(method, in_dim, clin_dim)``.

Where they live: the pooling in :mod:`bd.mil.pooling` (on a CPU it runs through
:mod:`bd.mil.bagwise`; the patch layer's products are in :mod:`bd.mil.kernels`), the shared
interface and blocks in :mod:`bd.mil.base`, the baselines in :mod:`bd.mil.baselines`, BD in
:mod:`bd.mil.distillation`; this module imports them all (which registers every model) and builds
them by method name.

Building blocks (Section III-A: fully connected layers with ReLU):

* :class:`AttentionPool` -- eq. (1): patch features -> FC + ReLU instance embedding -> ``H`` (two
  hidden FC + ReLU layers, one score per patch) -> softmax over each bag's patches -> weighted
  sum: the slide feature. It works on packed bags (all patches of a batch in one tensor plus
  offsets): one matmul over every patch, then, on a GPU, a padded segment softmax; on a CPU, the
  score layers and softmax a few bags at a time with the pools stacked (:mod:`bd.mil.bagwise`).
  Never a loop over patches.
* :func:`clinical_encoder` -- the clinical MLP ``f_c``; :class:`Prompt` -- the learnable prompt
  ``x_p`` mapped by layers of 100 and 50 units to ``f_p``; :func:`classifier` -- ``G``.

Every model takes a :class:`bd.mil.bags.Batch` and provides ``losses(batch, stage)`` for training
(a dict whose ``"loss"`` is minimised), ``predict(batch) -> (prob, branch)`` for inference (the
branch that answered each patient), ``stages()`` (two-stage methods train their parts in turn,
each with its own early stopping) and ``conditions`` (the (clinical, slide) presence patterns the
method is meant for; validation and the decision threshold use them).
"""

from __future__ import annotations

import inspect
from typing import Any

from bd.errors import ConfigError
from bd.mil import baselines, distillation  # noqa: F401  (importing them registers their models)
from bd.mil.base import (  # noqa: F401  (the models' shared interface, re-exported)
    ALL_CONDITIONS, COMPLETE, CONDITION_NAMES, DIRECTIONS, MODELS, NO_CLINICAL, NO_SLIDE, PRECISIONS,
    Condition, MILModel, Prompt, Stage, register,
)
from bd.mil.baselines import (  # noqa: F401
    SMIL, AutoEncoder, ClinicalOnly, Ensemble, Filling, Fusion, ImageOnly, ModalityDropout,
)
from bd.mil.distillation import BidirectionalDistillation, BidirectionalDistillationSlideMissing  # noqa: F401
from bd.mil.pooling import (  # noqa: F401
    AttentionPool, attention_pools, embed_instances, folds_standardisation, input_dtype, input_standardisation,
    model_pools, segment_softmax_pool, standardised_inputs,
)


def model_kwargs(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``params`` that the model class of ``method`` takes."""
    cls = model_class(method)
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in params.items() if k in accepted and k not in ("self", "in_dim", "clin_dim")}


def model_class(method: str) -> type[MILModel]:
    if method not in MODELS:
        raise ConfigError(f"training.method: unknown method '{method}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[method]


def create_model(method: str, in_dim: int, clin_dim: int, /, **params: Any) -> MILModel:
    """Build the model of ``method`` for ``in_dim``-d patch features and ``clin_dim`` clinical
    columns; ``params`` may hold any training parameter, each model takes the ones it knows."""
    return model_class(method)(in_dim, clin_dim, **model_kwargs(method, params))
