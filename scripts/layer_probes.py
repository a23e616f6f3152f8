"""Gender decodability and task-probe accuracy of one (model, layer) (sbssl.probes)."""
import os

from sbssl.io import job_log, write_json_atomic
from sbssl.probes import layer_probes

# The probe is BLAS-bound; with more BLAS threads than the job's cores it slows down several times.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(snakemake.threads))
with job_log(snakemake.log[0]):
    settings = snakemake.params.settings
    result = layer_probes(
        snakemake.params.layer_file,
        snakemake.input.manifest,
        attribute=settings["attribute"],
        groups=settings["groups"],
        task=settings["task"],
        task_folder=settings["task_folder"],
        folds=settings["folds"],
        repeats=settings["repeats"],
        permutations=settings["permutations"],
        seed=settings["seed"],
    )
    write_json_atomic(snakemake.output[0], {"model": snakemake.wildcards.model, "layer": snakemake.wildcards.layer, **result})
    print({k: (v or {}).get("accuracy_mean") for k, v in result.items() if k in ("leakage", "task_probe")})
