# The pixel-permutation control (paper section 4.2): the target images of the control tests are
# pixel-shuffled, embedded by the control models, and the tests re-run. The same rules as the main
# branch, on the control stimuli tree under {results}/control/.
C = f"{R}/control"


rule control_stimuli:
    input:
        manifest=MANIFEST,
        stimuli=stimuli_input(),
    output:
        directory(f"{C}/stimuli"),
    params:
        root=stimuli_param,
        tests=[asdict(CATALOGUE[t]) for t in CONTROL_TESTS],
        seed=config["control"]["seed"],
    log:
        f"{C}/logs/stimuli.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/control_stimuli.py"


use rule stimuli_manifest as control_manifest with:
    input:
        stimuli=f"{C}/stimuli",
        catalogue=config["catalogue"],
    output:
        f"{C}/manifest.csv",
    params:
        root=stimuli_param,
        skip_bad=False,
        validate_catalogue=False,
    log:
        f"{C}/logs/manifest.log",
    benchmark:
        f"{C}/benchmarks/manifest.tsv"


use rule embed_layers as control_embed_layers with:
    input:
        manifest=f"{C}/manifest.csv",
        stimuli=f"{C}/stimuli",
        weights=weights_input,
    output:
        embedding_outputs(C),
    params:
        model=model_spec,
        root=stimuli_param,
        layers=LAYERS_RUN,
        embedding=config["embedding"],
    log:
        f"{C}/logs/embeddings/{{model}}.log",
    benchmark:
        f"{C}/benchmarks/embed_layers/{{model}}.tsv"


use rule cosine_similarities as control_cosine_similarities with:
    input:
        f"{C}/embeddings/{{model}}/{{layer}}.h5",
    output:
        f"{C}/similarity/{{model}}/{{layer}}.h5",
    log:
        f"{C}/logs/similarity/{{model}}/{{layer}}.log",
    benchmark:
        f"{C}/benchmarks/cosine_similarities/{{model}}/{{layer}}.tsv"


use rule association_test as control_association_test with:
    input:
        similarity=f"{C}/similarity/{{model}}/{{layer}}.h5",
        manifest=f"{C}/manifest.csv",
    output:
        f"{C}/tests/{{model}}/{{layer}}/{{test}}/{{seed}}.json",
    log:
        f"{C}/logs/tests/{{model}}/{{layer}}/{{test}}/{{seed}}.log",


use rule tests_table as control_tests_table with:
    input:
        results=test_results(C, CONTROL_MODELS, CONTROL_TESTS),
        zoo=config["zoo"],
    output:
        f"{C}/tables/tests.csv",
    log:
        f"{C}/logs/tables/tests.log",


rule control_survival:
    input:
        original=f"{R}/tables/tests.csv",
        permuted=f"{C}/tables/tests.csv",
    output:
        report(
            f"{R}/tables/control.csv",
            caption="report/control.rst",
            category="Tables",
        ),
    params:
        alpha=config["control"]["alpha"],
    log:
        f"{R}/logs/tables/control.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/control_survival.py"
