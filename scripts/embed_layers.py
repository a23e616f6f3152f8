"""One forward pass per batch over every distinct stimulus image, all layers captured (sbssl.embed)."""
from pathlib import Path

from sbssl.embed import embed_model_layers
from sbssl.io import job_log
from sbssl.models import model_spec_from_dict

with job_log(snakemake.log[0]):
    settings = snakemake.params.embedding
    report = embed_model_layers(
        model_spec_from_dict(snakemake.params.model),
        manifest=snakemake.input.manifest,
        stimuli_root=snakemake.params.root,
        out_paths=dict(zip(snakemake.params.layers, snakemake.output)),
        weights_path=snakemake.input.weights or None,
        preprocessing=settings["preprocessing"],
        pooling=settings["pooling"],
        dtype=settings["dtype"],
        batch_size=settings["batch_size"],
        device=settings["device"],
    )
    print(report)
