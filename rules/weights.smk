# Stage 2: checkpoints from the public model zoos, verified by hash, written atomically. A present,
# verified file is never downloaded again; the first fetch of a model records the file's full sha256 in
# the weights lock (config key weights_lock), against which every later fetch and use is verified.
# Random initialisations have no weights file; Hugging Face models are a folder (a pinned hub snapshot).
# Local rules: on a cluster they run where Snakemake runs (login nodes have internet, compute nodes often not).
localrules:
    fetch_weights,
    fetch_weights_folder,


rule fetch_weights:
    output:
        "pretrains/{model}.pth",
    params:
        model=weights_definition,
        weights_lock=WEIGHTS_LOCK,
    wildcard_constraints:
        model=only_names(FILE_WEIGHTS),
    log:
        "pretrains/logs/{model}.log",
    retries: 2
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/fetch_weights.py"


use rule fetch_weights as fetch_weights_folder with:
    output:
        directory("pretrains/{model}"),
    wildcard_constraints:
        model=only_names(FOLDER_WEIGHTS),
