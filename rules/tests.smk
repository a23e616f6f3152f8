# Stage 4: one permutation test per (model, layer, test, seed), then the per-test table.
# About 10,500 jobs in the full study: the job body runs in the Snakemake process (`run:` with
# force-use-threads in profiles/default) and reads the similarity matrix through an in-process cache,
# so a job costs milliseconds instead of a Python start-up (benchmarks/bench_dag.py measures it).
# `code` is not used by the body: the digest of the test stage's sbssl code, so that a change of it
# reruns the tests.


rule association_test:
    input:
        similarity=f"{R}/similarity/{{model}}",
        manifest=MANIFEST,
    output:
        f"{R}/tests/{{model}}/{{layer}}/{{test}}/{{seed}}.json",
    params:
        test=test_definition,
        options={"permutations": config["permutations"], "alternative": config["alternative"], **config["bootstrap"]},
        code=code_digest("test"),
        layer_file=layer_file,
    resources:
        mem_mb=500,
        runtime=5,
    log:
        f"{R}/logs/tests/{{model}}/{{layer}}/{{test}}/{{seed}}.log",
    run:
        from sbssl.runner import record_association_test, single_threaded_blas

        single_threaded_blas()  # these jobs are threads of Snakemake: BLAS threads would only spin
        record_association_test(
            params.layer_file, input.manifest, params.test, output[0], log[0],
            model=wildcards.model, layer=wildcards.layer, seed=int(wildcards.seed), **params.options,
        )  # fmt: skip


rule tests_table:
    input:
        results=test_results(R, MODELS, TESTS),
        zoo=config["zoo"],
        catalogue=config["catalogue"],
    output:
        report(
            f"{R}/tables/tests.csv",
            caption="report/tests_table.rst",
            category="Tables",
        ),
    params:
        code=code_digest("tables"),
    log:
        f"{R}/logs/tables/tests.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/tests_table.py"
