"""Per-layer budgets: measure each leaf's sensitivity, allocate options to meet a budget, apply.

::

    s = jc.budget.sensitivity(fn, params, batches, {"int8": QuantSpec(bits=8),
                                                   "int4": QuantSpec(bits=4), "float": None})
    rules = jc.budget.allocate(s, ratio=6)       # [(regex, QuantSpec | None), ...]
    q = jc.budget.compress(params, rules)        # or fn=, batches= for GPTQ

The rules are the same ordered ``(regex, option)`` rules users write by hand for ``quantize``
and the mask criteria.
"""

from jcompress.budget._allocate import allocate
from jcompress.budget._compress import compress
from jcompress.budget._sensitivity import Sensitivity, default_metric, sensitivity

__all__ = ["Sensitivity", "allocate", "compress", "default_metric", "sensitivity"]
