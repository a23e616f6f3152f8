# Stage 2: checkpoints from the public model zoos, verified by hash, written atomically. A present,
# verified file is never downloaded again; the first fetch of a model records the file's full sha256 in
# the weights lock (config key weights_lock), against which every later fetch and use is verified.
# Random initialisations have no weights file.
# Local rule: on a cluster it runs where Snakemake runs (login nodes have internet, compute nodes often not).
localrules:
    fetch_weights,


rule fetch_weights:
    output:
        "pretrains/{model}.pth",
    params:
        model=model_definition,
        weights_lock=WEIGHTS_LOCK,
    log:
        "pretrains/logs/{model}.log",
    retries: 2
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/fetch_weights.py"
