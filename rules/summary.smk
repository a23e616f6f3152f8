# Stage 5: what readers look at. The per-test table is averaged over seeds (plus the model "random"
# = mean of the random initialisations) with adjusted p-values; then the contrastive vs
# non-contrastive meta-test and the paper's figures. The same functions back `sbssl summarize`.
# With paper_study.enabled, the paper's own study is recomputed from its published per-test rows into
# {results}/paper/ (same functions), so the report shows the published result beside the live run.
FIGURE_NAMES = ["bias_counts", "intersectional", "strength"]
FIGURES = FIGURE_NAMES + [f"heatmap_{config['summary']['heatmap_layer']}", "bias_by_depth"]
PAPER_FIGURES = FIGURE_NAMES + ["heatmap_avgpool"]


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
    params:
        code=code_digest("tables"),
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
    params:
        meta_test_layer=config["summary"]["meta_test_layer"],
        code=code_digest("tables"),
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
        [figure_report(R, name) for name in FIGURES],
        expand(f"{R}/figures/{{name}}.{{ext}}", name=FIGURES, ext=["pdf", "rst"]),
    params:
        heatmap_layer=config["summary"]["heatmap_layer"],
        intersectional_layer=config["summary"]["meta_test_layer"],
        code=code_digest("tables"),
    log:
        f"{R}/logs/figures.log",
    benchmark:
        f"{R}/benchmarks/figures.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/figures.py"


rule paper_study:
    input:
        rows=config["paper_study"]["rows"],
        catalogue=config["paper_study"]["catalogue"],
    output:
        summary=f"{R}/paper/summary.csv",
        counts=f"{R}/paper/counts.csv",
        meta_test=report(
            f"{R}/paper/meta_test.json",
            caption="report/paper_meta_test.rst",
            category="Paper (published rows)",
        ),
        figures=[figure_report(f"{R}/paper", name, "Paper (published rows)") for name in PAPER_FIGURES],
        other=expand(f"{R}/paper/figures/{{name}}.{{ext}}", name=PAPER_FIGURES, ext=["pdf", "rst"]),
    params:
        code=code_digest("tables"),
    log:
        f"{R}/logs/paper_study.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/paper_study.py"
