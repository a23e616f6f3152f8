# Debiasing (opt-in, debias.enabled): ERM, GroupDRO (true groups, the reference), Wang et al.'s adversarial
# removal and ClusterFix, one training job per (data set, method, seed) (sbssl.debias documents each method),
# then the table and figure of worst-group and average accuracy over the runs. With debias.audit, every
# trained backbone becomes a zoo model (its weights: the run's model.pt, verified against the lock its job
# writes) and goes through the same embedding, iEAT tests and probes as the study's models; the audit table
# sets its bias counts beside its baseline's (ERM: the network before debiasing).
# Included only when enabled (Snakefile): its imports (torch, the training code) cost every other run time.
from sbssl.debias.audit import DebiasRun, debiased_model_name, debiased_zoo_entry
from sbssl.debias.datasets import WATERBIRDS_FOLDER
from sbssl.debias.train import method_settings

DEBIAS_DATASETS = D["datasets"]
# What a run's numbers depend on, per data set: every setting (sbssl.debias.DebiasConfig), checked here.
DEBIAS_SETTINGS = {dataset: debias_settings(dataset) for dataset in DEBIAS_DATASETS}
if "celeba" in DEBIAS_DATASETS and "celeba" not in D["data"]:
    raise WorkflowError("config key 'debias.data.celeba': CelebA has no stable download URL; give its local folder")
WATERBIRDS_DIR = D["data"].get("waterbirds", f"data/waterbirds/{WATERBIRDS_FOLDER}")
DEBIAS_RUNS = [DebiasRun(d, m, s) for d in DEBIAS_DATASETS for m in D["methods"] for s in D["seeds"]]

wildcard_constraints:
    dataset="colored-digits|waterbirds|celeba",
    method="erm|groupdro|adversarial|clusterfix",


# The trained backbones join the zoo and the embedding stage (their layers all tested, whatever `layers:`
# selects for the study's models).
AUDIT_MODELS = {}
if D["audit"]:
    for _run in DEBIAS_RUNS:
        _name = debiased_model_name(_run)
        if _name in ZOO:
            raise WorkflowError(f"zoo model {_name!r} ({config['zoo']}) clashes with a debiased backbone's name; rename it")
        _folder = debias_run_folder(_run)
        ZOO[_name] = debiased_zoo_entry(_run, f"{_folder}/model.pt", DEBIAS_SETTINGS[_run.dataset]["backbone"])
        MODEL_LAYERS[_name] = model_layer_slugs(ZOO[_name])
        TRAINED_WEIGHTS[_name] = (f"{_folder}/model.pt", f"{_folder}/weights.lock")
        AUDIT_MODELS[_name] = _run


localrules:
    fetch_waterbirds,


rule fetch_waterbirds:
    output:
        f"data/waterbirds/{WATERBIRDS_FOLDER}/metadata.csv",
    params:
        url=D["waterbirds_url"],
        lock=D["lock"],
    log:
        "data/waterbirds/fetch.log",
    retries: 2
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/fetch_waterbirds.py"


# A killed job leaves checkpoint.pt in its folder (not an output, so Snakemake keeps it): the rerun resumes
# from it and gives the same metrics as an uninterrupted run.
rule debias_train:
    input:
        data=debias_data_input,
        init=debias_init_input,
    output:
        metrics=f"{DB}/{{dataset}}/{{method}}/{{seed}}/metrics.json",
        model=f"{DB}/{{dataset}}/{{method}}/{{seed}}/model.pt",
        lock=f"{DB}/{{dataset}}/{{method}}/{{seed}}/weights.lock",
    params:
        settings=lambda w: method_settings(DEBIAS_SETTINGS[w.dataset], w.method),
        data=lambda w: None if w.dataset == "colored-digits" else D["data"].get(w.dataset, WATERBIRDS_DIR),
        init_model=debias_init_model,
        weights_lock=WEIGHTS_LOCK,
        code=code_digest("debias"),
    # the small CNN trains on one CPU thread (sbssl.debias.run_debias), so two runs share 2 cores; the
    # ResNet-50 runs decode images with threads - 1 workers
    threads: lambda w: 1 if w.dataset == "colored-digits" else 4
    resources:
        # the embedded set trains a small CNN in minutes on CPU; the others a ResNet-50 on a GPU
        gpu=lambda w: 0 if w.dataset == "colored-digits" else 1,
        mem_mb=lambda w: 3000 if w.dataset == "colored-digits" else 16000,
        runtime=lambda w: 30 if w.dataset == "colored-digits" else 1440,
    log:
        f"{R}/logs/debias/{{dataset}}/{{method}}/{{seed}}.log",
    benchmark:
        f"{R}/benchmarks/debias/{{dataset}}/{{method}}/{{seed}}.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/debias_train.py"


rule debias_table:
    input:
        [f"{debias_run_folder(run)}/metrics.json" for run in DEBIAS_RUNS],
    output:
        table=report(f"{R}/tables/debias.csv", caption="report/debias.rst", category="Debiasing"),
        runs=f"{R}/tables/debias_runs.csv",
        figure=figure_report(R, "debias", "Debiasing"),
        files=multiext(f"{R}/figures/debias", ".pdf", ".rst"),
    params:
        methods=D["methods"],
        code=code_digest("debias_tables"),
    log:
        f"{R}/logs/tables/debias.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/debias_table.py"


rule debias_audit:
    input:
        results=[
            f"{R}/tests/{model}/{layer}/{test}/{seed}.json"
            for model in AUDIT_MODELS
            for layer in MODEL_LAYERS[model]
            for test in TESTS
            for seed in SEEDS
        ],
        probes=[f"{R}/probes/{m}/{layer}.json" for m in AUDIT_MODELS for layer in MODEL_LAYERS[m]]
        if config["probes"]["enabled"]
        else [],
        catalogue=config["catalogue"],
    output:
        report(f"{R}/tables/debias_audit.csv", caption="report/debias_audit.rst", category="Debiasing"),
    params:
        runs={model: asdict(run) for model, run in AUDIT_MODELS.items()},
        threshold=D["threshold"],
        baseline=D["baseline"],
        code=code_digest("debias_audit"),
    log:
        f"{R}/logs/tables/debias_audit.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/debias_audit.py"
