# Stage 2: checkpoints from the public model zoos, verified by hash, written atomically. A present,
# verified file is never downloaded again. Random initialisations have no weights file.


rule fetch_weights:
    output:
        "pretrains/{model}.pth",
    params:
        model=model_spec,
    log:
        "pretrains/logs/{model}.log",
    retries: 2
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/fetch_weights.py"
