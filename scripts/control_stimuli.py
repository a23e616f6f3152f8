"""Write the pixel-permutation control's stimuli tree (sbssl.control)."""
from sbssl.control import build_control_stimuli
from sbssl.io import job_log
from sbssl.stimuli import read_manifest

with job_log(snakemake.log[0]):
    written = build_control_stimuli(
        snakemake.params.root,
        read_manifest(snakemake.input.manifest),
        snakemake.params.tests,
        snakemake.output[0],
        seed=snakemake.params.seed,
    )
    print(written["role"].value_counts().to_string())
