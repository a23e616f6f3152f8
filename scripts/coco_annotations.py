"""The COCO annotation table: gender from the captions, one 0/1 column per object label (sbssl.coco)."""
from sbssl.coco import coco_annotations, write_annotations
from sbssl.io import job_log

with job_log(snakemake.log[0]):
    instances_train, instances_val, captions_train, captions_val = snakemake.input
    table = coco_annotations(
        {"train2014": instances_train, "val2014": instances_val},
        {"train2014": captions_train, "val2014": captions_val},
        seed=snakemake.params.seed,
    )
    write_annotations(table, snakemake.output[0])
    print(table.groupby(["split", "gender"]).size().to_string())
