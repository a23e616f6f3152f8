"""Generate the offline demo's procedural stimuli (sbssl.demo)."""
from sbssl.demo import generate_demo_stimuli
from sbssl.io import job_log

with job_log(snakemake.log[0]):
    paths = generate_demo_stimuli(snakemake.output[0], images_per_concept=snakemake.params.images_per_concept)
    print(f"wrote {len(paths)} images under {snakemake.output[0]}")
