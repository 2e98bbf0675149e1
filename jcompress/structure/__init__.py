"""jcompress.structure: changes to a model's structure (low-rank factorization)."""

from jcompress.structure._lowrank import LayerSavings as LayerSavings
from jcompress.structure._lowrank import LowRank as LowRank
from jcompress.structure._lowrank import LowRankReport as LowRankReport
from jcompress.structure._lowrank import low_rank as low_rank
from jcompress.structure._lowrank import low_rank_report as low_rank_report

__all__ = ["LayerSavings", "LowRank", "LowRankReport", "low_rank", "low_rank_report"]
