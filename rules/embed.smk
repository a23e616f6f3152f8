# Stage 3: every distinct image goes through each model once; every layer of the model is captured in
# that one pass (GPU job on a cluster), and the same job reduces each layer to the cosine-similarity
# matrix of the distinct images: the only thing the permutation tests read.
#
# The job covers every layer of the model, whatever `layers:` selects for testing, so adding a layer to
# a finished study runs only that layer's tests. The similarity matrices are update() outputs: a
# failing rerun of the job (a bad checkpoint, a lost GPU) restores them, so it never deletes the valid
# results of the previous run. The job reruns when its params (the model's definition, the embedding
# settings, the code) change, or when a job it depends on reruns (the stimuli manifest); the embeddings
# are kept or dropped (keep_embeddings) without any rerun.


rule embed_layers:
    input:
        manifest=MANIFEST,
        stimuli=stimuli_input(),
        weights=weights_input,
        lock=weights_lock_input,
    output:
        similarity=similarity_outputs(R),
        embeddings=embedding_outputs(R),
    params:
        model=model_definition,
        root=stimuli_param,
        layers=model_layer_list,
        embedding=EMBEDDING_DEFINITION,
        weights_lock=weights_lock,
        permutation=None,
        code=code_digest("similarity"),  # the embedding and similarity code (sbssl.provenance)
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
