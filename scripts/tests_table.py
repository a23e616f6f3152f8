"""Validate the per-job association-test results and join them with their labels into the per-test table:
the model's family from the zoo, the test's title and group from the catalogue (see sbssl.runner)."""
from sbssl.catalogue import load_catalogue
from sbssl.io import atomic_path, job_log
from sbssl.models import load_zoo
from sbssl.per_test_table import tests_table

with job_log(snakemake.log[0]):
    table = tests_table(
        snakemake.input.results, load_zoo(snakemake.input.zoo), load_catalogue(snakemake.input.catalogue)
    )
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(table)} rows")
