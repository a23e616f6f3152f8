"""Hash and decode every stimulus file; fail early if a catalogue folder is missing or empty."""
from sbssl.catalogue import load_catalogue
from sbssl.io import job_log
from sbssl.stimuli import build_manifest, write_manifest

with job_log(snakemake.log[0]):
    if snakemake.params.get("validate_catalogue", True):
        load_catalogue(snakemake.input.catalogue, stimuli_root=snakemake.params.root)
    manifest = build_manifest(snakemake.params.root, skip_bad=snakemake.params.skip_bad)
    write_manifest(manifest, snakemake.output[0])
    print(f"{len(manifest)} files, {manifest['sha256'].nunique()} distinct images")
