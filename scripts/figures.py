"""The paper's figures, the effect-size heat map and bias counts by relative depth (sbssl.figures)."""
from pathlib import Path

from sbssl.figures import write_figures
from sbssl.io import job_log
from sbssl.models import load_zoo
from sbssl.summary import read_summary

with job_log(snakemake.log[0]):
    write_figures(
        read_summary(snakemake.input.summary),
        load_zoo(snakemake.input.zoo),
        Path(snakemake.output[0]).parent,
        heatmap_layer=snakemake.params.heatmap_layer,
        intersectional_layer=snakemake.params.intersectional_layer,
        depth_figure=True,
    )
