# Stage 5: what readers look at. The per-test table is averaged over seeds (plus the model "random"
# = mean of the random initialisations) with adjusted p-values; then the contrastive vs
# non-contrastive meta-test and the paper's figures. The same functions back `sbssl summarize`.
FIGURES = ["bias_counts", "intersectional", "strength", f"heatmap_{config['summary']['heatmap_layer']}"]


rule summarize:
    input:
        tests=f"{R}/tables/tests.csv",
        zoo=config["zoo"],
    output:
        summary=report(
            f"{R}/tables/summary.csv",
            caption="report/summary.rst",
            category="Tables",
        ),
        counts=report(
            f"{R}/tables/counts.csv",
            caption="report/counts.rst",
            category="Tables",
        ),
    log:
        f"{R}/logs/tables/summary.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/summarize.py"


rule meta_test:
    input:
        summary=f"{R}/tables/summary.csv",
        zoo=config["zoo"],
    output:
        report(
            f"{R}/meta_test.json",
            caption="report/meta_test.rst",
            category="Meta-test",
        ),
    log:
        f"{R}/logs/meta_test.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/meta_test.py"


rule figures:
    input:
        summary=f"{R}/tables/summary.csv",
        zoo=config["zoo"],
    output:
        [figure_report(name) for name in FIGURES],
        expand(f"{R}/figures/{{name}}.{{ext}}", name=FIGURES, ext=["pdf", "rst"]),
    params:
        heatmap_layer=config["summary"]["heatmap_layer"],
    log:
        f"{R}/logs/figures.log",
    benchmark:
        f"{R}/benchmarks/figures.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/figures.py"
