"""Download one model's checkpoint into pretrains/, verified and atomic (sbssl.models)."""
from pathlib import Path

from sbssl.io import job_log
from sbssl.models import fetch_weights, model_spec_from_dict

with job_log(snakemake.log[0]):
    path = fetch_weights(model_spec_from_dict(snakemake.params.model), Path(snakemake.output[0]).parent)
    if path != Path(snakemake.output[0]):
        raise RuntimeError(f"fetch_weights wrote {path}, the workflow expects {snakemake.output[0]}")
