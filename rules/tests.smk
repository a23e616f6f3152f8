# Stage 4: one job per (model, layer, test) runs its permutation test with every seed (one result file
# per seed), then the per-test table. About 3,500 jobs in the full study (4,200 with the control): the
# job body is a thread of the Snakemake process (`run:` with force-use-threads in profiles/default) that
# hands the tests to one long-lived worker process (sbssl.runner.record_association_tests_job),
# which reads each similarity matrix once through its cache, so a job costs milliseconds instead of a
# Python start-up (benchmarks/bench_dag.py measures it). `code` is not used by the body: the digest of
# the test stage's sbssl code, so that a change of it reruns the tests.
#
# Snakemake's own cost is about a millisecond per job, in the dry run and in the DAG, so the seeds share a
# job: a job per seed tripled the DAG and the full study's dry run took 14 s (benchmarks/bench_dryrun.py).
# The price: adding a seed reruns every test job, and the existing seeds' files come back with the same
# bytes (a seed's result depends only on its own seed). Adding a model, layer or test still runs only its
# jobs. The seeds are not a param: removing one leaves the finished jobs complete.
# The rule is also kept lean for the DAG:
# - the function params carry their signature: Snakemake inspects it three times per job and param, and
#   a stored __signature__ makes inspect.signature a lookup;
# - tmpdir is fixed at parse time instead of Snakemake's default expression, which it evaluates with
#   eval() on every job; the body writes no temporary files (a group job on a cluster node parses the
#   workflow there, so it still gets that node's temporary folder).
# The run: block's text is Snakemake's code rerun trigger: editing it reruns every finished test.
import inspect
import tempfile

for _param in (test_definition, layer_file):
    _param.__signature__ = inspect.signature(_param)

# With a core to spare, the tests run in one worker process beside Snakemake's scheduler instead of taking
# turns with it for the interpreter lock; inside a cluster job (one Snakemake per job) and on one core, here.
TESTS_IN_WORKER = workflow.is_main_process and (workflow.resource_settings.cores or 1) > 1


rule association_test:
    input:
        similarity=f"{R}/similarity/{{model}}",
        manifest=MANIFEST,
    output:
        seed_results(R),
    params:
        test=test_definition,
        options={"permutations": config["permutations"], "alternative": config["alternative"], **config["bootstrap"]},
        code=code_digest("test"),
        layer_file=layer_file,
    resources:
        mem_mb=500,
        runtime=5,
        tmpdir=tempfile.gettempdir(),
    log:
        f"{R}/logs/tests/{{model}}/{{layer}}/{{test}}.log",
    run:
        from sbssl.runner import record_association_tests_job

        record_association_tests_job(
            params.layer_file, input.manifest, params.test, dict(zip(SEEDS, output)), log[0],
            in_worker=TESTS_IN_WORKER, model=wildcards.model, layer=wildcards.layer, **params.options,
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
