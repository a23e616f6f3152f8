# Representation leakage (Wang et al. ICCV 2019, applied per layer) and the bias-accuracy trade-off
# (SB-SSL's closing claim): for every (model, layer), a cross-validated linear probe on the cached cosine
# similarities decodes the attribute (by default gender, from the stimuli folders that carry it) and a
# task (the classes = sub-folders of a folder the config names); then one table and one figure each, with
# the iEAT bias count of that layer beside. sbssl.probes documents the probe.
P = config["probes"]
# What a probe's numbers depend on (not `threshold`, which only picks the bias count shown beside them).
PROBE_SETTINGS = {k: P[k] for k in ("attribute", "groups", "task", "task_folder", "folds", "repeats", "permutations", "seed")}


rule layer_probes:
    input:
        similarity=f"{R}/similarity/{{model}}",
        manifest=MANIFEST,
    output:
        f"{R}/probes/{{model}}/{{layer}}.json",
    params:
        settings=PROBE_SETTINGS,
        code=code_digest("probes"),
        layer_file=layer_file,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        f"{R}/logs/probes/{{model}}/{{layer}}.log",
    benchmark:
        f"{R}/benchmarks/probes/{{model}}/{{layer}}.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/layer_probes.py"


rule probe_tables:
    input:
        results=[f"{R}/probes/{m}/{layer}.json" for m in MODELS for layer in tested_layers(m)],
        counts=f"{R}/tables/counts.csv",
    output:
        leakage=report(f"{R}/tables/leakage.csv", caption="report/leakage.rst", category="Leakage"),
        tradeoff=report(f"{R}/tables/tradeoff.csv", caption="report/tradeoff.rst", category="Leakage"),
        figures=[figure_report(R, name, "Leakage") for name in ("decodability", "tradeoff")],
        captions=expand(f"{R}/figures/{{name}}.{{ext}}", name=["decodability", "tradeoff"], ext=["pdf", "rst"]),
    params:
        threshold=P["threshold"],
        code=code_digest("probes"),
    log:
        f"{R}/logs/tables/probes.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/probe_tables.py"
