"""The contrastive vs non-contrastive meta-test (sbssl.meta), paper-compatible, robust and area test."""
from sbssl.io import job_log, write_json_atomic
from sbssl.meta import meta_test_report
from sbssl.models import load_zoo
from sbssl.summary import read_summary

with job_log(snakemake.log[0]):
    write_json_atomic(
        snakemake.output[0],
        meta_test_report(
            read_summary(snakemake.input.summary),
            load_zoo(snakemake.input.zoo),
            layer=snakemake.params.meta_test_layer,
        ),
    )
