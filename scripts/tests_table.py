"""Concatenate the per-job association-test results into the per-test table, with each model's family."""
from sbssl.io import atomic_path, job_log
from sbssl.models import load_zoo
from sbssl.runner import tests_table

with job_log(snakemake.log[0]):
    families = {name: spec.family for name, spec in load_zoo(snakemake.input.zoo).items()}
    table = tests_table(snakemake.input.results, families)
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(table)} rows")
