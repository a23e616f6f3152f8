# Stage 3: every distinct image goes through each model once; all configured layers are captured in
# that one pass (GPU job on a cluster). Then one cosine-similarity matrix per (model, layer): the only
# thing the permutation tests read.


rule embed_layers:
    input:
        manifest=MANIFEST,
        stimuli=stimuli_input(),
        weights=weights_input,
    output:
        embedding_outputs(R),
    params:
        definition=embedding_definition,
        model=model_definition,
        root=stimuli_param,
        layers=LAYERS_RUN,
        embedding=EMBEDDING_DEFINITION,
        weights_lock=WEIGHTS_LOCK,
        permutation=None,
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=120,
    log:
        f"{R}/logs/embeddings/{{model}}.log",
    benchmark:
        f"{R}/benchmarks/embed_layers/{{model}}.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/embed_layers.py"


rule cosine_similarities:
    input:
        ancient(f"{R}/embeddings/{{model}}/{{layer}}.h5"),
    output:
        f"{R}/similarity/{{model}}/{{layer}}.h5",
    params:
        definition=similarity_definition,
    resources:
        mem_mb=4000,
        runtime=30,
    log:
        f"{R}/logs/similarity/{{model}}/{{layer}}.log",
    benchmark:
        f"{R}/benchmarks/cosine_similarities/{{model}}/{{layer}}.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/cosine_similarities.py"
