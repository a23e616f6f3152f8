"""Cosine similarities of all distinct images of one (model, layer)."""
from sbssl.io import job_log
from sbssl.similarity import cosine_similarities

with job_log(snakemake.log[0]):
    cosine_similarities(snakemake.input[0], snakemake.output[0])
