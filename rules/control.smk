# The pixel-permutation control (paper section 4.2): the control models embed the main stimuli again,
# with the spatial positions of each target image's input tensor shuffled after preprocessing (a seeded
# permutation per image, sbssl.control), and the control tests re-run on those embeddings. Attribute
# images are embedded as they are. The same rules as the main branch, under {results}/control/.
use rule embed_layers as control_embed_layers with:
    output:
        similarity=similarity_outputs(C),
        embeddings=embedding_outputs(C),
    params:
        model=model_definition,
        root=stimuli_param,
        layers=model_layer_list,
        embedding=EMBEDDING_DEFINITION,
        weights_lock=WEIGHTS_LOCK,
        permutation=control_definition(),
        code=code_digest("control_embed"),
    log:
        f"{C}/logs/embeddings/{{model}}.log",
    benchmark:
        f"{C}/benchmarks/embed_layers/{{model}}.tsv"


use rule association_test as control_association_test with:
    input:
        similarity=f"{C}/similarity/{{model}}",
        manifest=MANIFEST,
    output:
        seed_results(C),
    log:
        f"{C}/logs/tests/{{model}}/{{layer}}/{{test}}.log",


use rule tests_table as control_tests_table with:
    input:
        results=test_results(C, CONTROL_MODELS, CONTROL_TESTS),
        zoo=config["zoo"],
        catalogue=config["catalogue"],
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
        code=code_digest("tables"),
    log:
        f"{R}/logs/tables/control.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/control_survival.py"
