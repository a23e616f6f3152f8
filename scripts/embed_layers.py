"""One forward pass per batch over every distinct stimulus image, all layers captured (sbssl.embed)."""
from sbssl.embed import embed_model
from sbssl.io import job_log
from sbssl.models import model_spec_from_dict

with job_log(snakemake.log[0]):
    settings = snakemake.params.embedding
    report = embed_model(
        model_spec_from_dict(snakemake.params.model),
        snakemake.input.weights or None,
        snakemake.input.manifest,
        snakemake.params.root,
        dict(zip(snakemake.params.layers, snakemake.output)),
        layers=snakemake.params.layers,
        preprocessing=settings["preprocessing"],
        pooling=settings["pooling"],
        dtype=settings["dtype"],
        batch_size=settings["batch_size"],
        device=settings["device"],
        progress=False,
    )
    print(report)
