"""Download one model's checkpoint (a file, or a Hugging Face folder) into pretrains/, verified against the zoo
and the weights lock, atomic (sbssl.models). params: model = the source, architecture and weights of this
job's model (model_definition_dict), weights_lock = lock path."""
from pathlib import Path

from sbssl.io import job_log
from sbssl.models import fetch_weights, model_definition_from_dict

with job_log(snakemake.log[0]):
    definition = model_definition_from_dict(snakemake.wildcards.model, snakemake.params.model)
    path = fetch_weights(definition, Path(snakemake.output[0]).parent, snakemake.params.weights_lock)
    if path != Path(snakemake.output[0]):
        raise RuntimeError(f"fetch_weights wrote {path}, the workflow expects {snakemake.output[0]}")
