"""A balanced subset: no label's man:woman ratio above alpha (sbssl.leakage.balanced_subset)."""
from sbssl.coco import write_annotations
from sbssl.io import job_log
from sbssl.leakage import balanced_subset, read_annotations

with job_log(snakemake.log[0]):
    alpha = float(snakemake.wildcards.alpha)
    subset = balanced_subset(read_annotations(snakemake.input[0], "gender"), alpha, attribute="gender", seed=snakemake.params.seed)
    write_annotations(subset, snakemake.output[0])
    print(f"alpha {alpha:g}: {len(subset)} images")
