"""Seed-averaged summary with adjusted p-values, and bias counts per threshold (sbssl.summary)."""
from sbssl.io import atomic_path, job_log
from sbssl.models import load_zoo
from sbssl.summary import bias_counts, read_tests_table, summarize

with job_log(snakemake.log[0]):
    summary = summarize(read_tests_table(snakemake.input.tests), load_zoo(snakemake.input.zoo))
    for table, path in ((summary, snakemake.output.summary), (bias_counts(summary), snakemake.output.counts)):
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
