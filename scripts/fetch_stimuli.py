"""Download the iEAT repository archive and install its stimuli tree, verified file by file (sbssl.stimuli)."""
from sbssl.io import job_log
from sbssl.stimuli import fetch_stimuli

with job_log(snakemake.log[0]):
    download = snakemake.params.download
    fetch_stimuli(
        snakemake.output[0],
        url=download["url"],
        archive_sha256=download["sha256"],
        subdir=download["subdir"],
        file_hashes=download["file_hashes"],
    )
