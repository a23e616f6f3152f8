"""The SB-SSL paper's own study from its published per-test rows: summary, counts, meta-test, figures."""
from pathlib import Path

from sbssl.io import job_log
from sbssl.published import published_zoo, read_published
from sbssl.study import write_study_summary

with job_log(snakemake.log[0]):
    paths = write_study_summary(
        read_published(snakemake.input.rows, catalogue=snakemake.input.catalogue),
        published_zoo(),
        Path(snakemake.output.summary).parent,
    )
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
