"""Worst-group and average accuracy over the debiasing runs: the table (mean, std over seeds), the per-run
table and the figure (sbssl.debias)."""
from pathlib import Path

from sbssl.debias import debias_runs, debias_table, plot_debias
from sbssl.figures import save_figure
from sbssl.io import atomic_path, job_log

with job_log(snakemake.log[0]):
    runs = debias_runs(snakemake.input)
    table = debias_table(runs)
    for frame, path in ((table, snakemake.output.table), (runs, snakemake.output.runs)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    save_figure(*plot_debias(runs, methods=snakemake.params.methods), Path(snakemake.output.figure).parent, "debias")
    print(table.to_string(index=False))
