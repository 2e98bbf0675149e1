"""jcompress.runtime: function transformations over one jaxpr walker.

``roles`` (what every parameter leaf is), ``capture`` (input statistics for calibration),
``tap`` (activations, differentiably), ``compressed`` (run on compressed parameter trees) and
``explain`` (which compiled path each compressed matmul took). ``fn`` is always a function of
pytrees; for the analysis transforms it is called as ``fn(params, *args)``.
"""

from jcompress.runtime._capture import InputStats, capture
from jcompress.runtime._compressed import compressed
from jcompress.runtime._explain import Explained, explain
from jcompress.runtime._roles import roles
from jcompress.runtime._tap import tap

__all__ = [
    "Explained",
    "InputStats",
    "capture",
    "compressed",
    "explain",
    "roles",
    "tap",
]
