"""One forward pass per batch over every distinct stimulus image, all layers captured (sbssl.embed), then
each layer's cosine-similarity matrix of the distinct images (sbssl.similarity).

params: model (model_definition_dict of the job's model; its name is the ``model`` wildcard), root, layers,
embedding (preprocessing, pooling, dtype), weights_lock, permutation (None, or the control's
{"tests": [image sets], "seed": int}). batch_size and device are execution settings read from the config.
"""
from sbssl.control import control_permutation
from sbssl.embed import embed_model
from sbssl.io import job_log
from sbssl.models import model_definition_from_dict
from sbssl.process import exit_when_orphaned
from sbssl.similarity import cosine_similarities
from sbssl.stimuli import read_manifest

exit_when_orphaned()  # a Snakemake killed with SIGKILL must not leave this job running and writing
with job_log(snakemake.log[0]):
    settings = {**snakemake.config["embedding"], **snakemake.params.embedding}
    permutation = snakemake.params.permutation
    permute = None
    if permutation:
        permute = control_permutation(read_manifest(snakemake.input.manifest), permutation["tests"], permutation["seed"])
        print(f"pixel-permutation control: {len(permute)} target images permuted (seed {permutation['seed']})")
    report = embed_model(
        model_definition_from_dict(snakemake.wildcards.model, snakemake.params.model),
        snakemake.input.weights or None,
        snakemake.input.manifest,
        snakemake.params.root,
        {layer: f"{snakemake.output.embeddings}/{layer}.h5" for layer in snakemake.params.layers},
        lock_path=snakemake.params.weights_lock,
        layers=snakemake.params.layers,
        preprocessing=settings["preprocessing"],
        pooling=settings["pooling"],
        dtype=settings["dtype"],
        batch_size=settings["batch_size"],
        device=settings["device"],
        permute=permute,
        progress=False,
    )
    print(report)
    for layer in snakemake.params.layers:
        similarity = cosine_similarities(f"{snakemake.output.embeddings}/{layer}.h5", f"{snakemake.output.similarity}/{layer}.h5")
        print(f"similarities: {similarity}")
