"""Download the Waterbirds archive, verified against the data lock, and extract it (sbssl.debias.fetch_waterbirds)."""
from pathlib import Path

from sbssl.debias import fetch_waterbirds
from sbssl.io import job_log

with job_log(snakemake.log[0]):
    folder = Path(snakemake.output[0]).parent
    print(fetch_waterbirds(folder.parent, snakemake.params.lock, url=snakemake.params.url, progress=False))
