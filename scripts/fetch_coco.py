"""Download the COCO 2014 annotation archive, verified against the data lock, and extract its JSONs (sbssl.coco)."""
from pathlib import Path

from sbssl.coco import fetch_coco_annotations
from sbssl.io import job_log

with job_log(snakemake.log[0]):
    paths = fetch_coco_annotations(
        Path(snakemake.output[0]).parent, lock_path=snakemake.params.lock, url=snakemake.params.url, progress=False
    )
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
