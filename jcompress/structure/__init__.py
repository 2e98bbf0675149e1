"""jcompress.structure: changes to a model's structure.

Low-rank factorization (``low_rank``), channel dependencies (``dependencies``) and physical
shrinking of channel-pruned models (``shrink``, ``shrink_linen``, ``shrink_nnx``).
"""

from jcompress.structure._graph import dependencies as dependencies
from jcompress.structure._lowrank import low_rank as low_rank
from jcompress.structure._lowrank_leaf import LowRank as LowRank
from jcompress.structure._lowrank_report import LayerSavings as LayerSavings
from jcompress.structure._lowrank_report import LowRankReport as LowRankReport
from jcompress.structure._lowrank_report import low_rank_report as low_rank_report
from jcompress.structure._shrink import shrink as shrink
from jcompress.structure._shrink import shrink_linen as shrink_linen
from jcompress.structure._shrink import shrink_nnx as shrink_nnx

__all__ = [
    "LayerSavings",
    "LowRank",
    "LowRankReport",
    "dependencies",
    "low_rank",
    "low_rank_report",
    "shrink",
    "shrink_linen",
    "shrink_nnx",
]
