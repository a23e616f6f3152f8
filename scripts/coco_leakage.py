"""Dataset leakage, model leakage and amplification of one annotation table (sbssl.leakage)."""
from pathlib import Path

from sbssl.io import job_log
from sbssl.leakage import leakage_report, read_annotations, read_predictions, write_leakage
from sbssl.provenance import provenance

with job_log(snakemake.log[0]):
    annotations = read_annotations(snakemake.input.annotations, "gender")
    predictions = read_predictions(snakemake.input.predictions, annotations) if snakemake.input.predictions else None
    report = leakage_report(
        annotations, predictions, attribute="gender", attacker=snakemake.params.attacker,
        rounds=snakemake.params.rounds, epochs=snakemake.params.epochs, seed=snakemake.params.seed,
    )  # fmt: skip
    paths = write_leakage(report, Path(snakemake.output[0]).parent, extra=provenance("leakage"))
    print(paths)
