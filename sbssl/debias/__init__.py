"""Debiasing: ERM, GroupDRO, adversarial removal (Wang et al.) and ClusterFix, scored by worst-group accuracy.

Entry points: :func:`run_debias` (one training job), :func:`debias_table` / :func:`debias_runs` (tables over
jobs' ``metrics.json``), :func:`plot_debias` (the figure), :func:`fetch_waterbirds` (the archive, sha256-locked).
"""

from sbssl.debias.datasets import DATASETS, DebiasData, fetch_waterbirds, load_dataset
from sbssl.debias.metrics import debias_runs, debias_table, plot_debias
from sbssl.debias.train import METHODS, DebiasConfig, default_config, run_debias

__all__ = [
    "DATASETS", "METHODS", "DebiasConfig", "DebiasData", "debias_runs", "debias_table", "default_config",
    "fetch_waterbirds", "load_dataset", "plot_debias", "run_debias",
]
