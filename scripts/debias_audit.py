"""Bias counts of the debiased backbones beside their baseline's (sbssl.debias.audit)."""
from sbssl.debias.audit import audit_from_results
from sbssl.io import atomic_path, job_log

with job_log(snakemake.log[0]):
    table = audit_from_results(
        snakemake.input.results, snakemake.input.probes, snakemake.params.runs, snakemake.input.catalogue,
        threshold=snakemake.params.threshold, baseline=snakemake.params.baseline,
    )
    with atomic_path(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
    print(table.to_string(index=False))
