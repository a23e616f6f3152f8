"""Leakage and trade-off tables and figures over every (model, layer) (sbssl.probes)."""
import json
from pathlib import Path

import pandas as pd

from sbssl.figures import save_figure
from sbssl.io import atomic_path, job_log
from sbssl.probes import plot_decodability, plot_tradeoff, probe_tables

with job_log(snakemake.log[0]):
    results = {}
    for path in snakemake.input.results:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        results[(record["model"], record["layer"])] = record
    leakage, tradeoff = probe_tables(results, pd.read_csv(snakemake.input.counts), snakemake.params.threshold)
    figures = Path(snakemake.output.figures[0]).parent
    for table, path, plot, name in (
        (leakage, snakemake.output.leakage, plot_decodability, "decodability"),
        (tradeoff, snakemake.output.tradeoff, plot_tradeoff, "tradeoff"),
    ):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        save_figure(*plot(table), figures, name)
