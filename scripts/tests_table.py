"""Concatenate the per-job association-test results into results/tables/tests.csv."""
from sbssl.io import atomic_path, job_log
from sbssl.runner import tests_table

with job_log(snakemake.log[0]):
    table = tests_table(snakemake.input)
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(table)} rows")
