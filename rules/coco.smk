# Dataset leakage, model leakage and bias amplification on COCO 2014 (Wang et al., ICCV 2019), opt-in
# (coco.enabled). The annotation archive is downloaded once (a local rule, its sha256 recorded in the data
# lock on the first fetch and checked afterwards), or read from a local folder (coco.annotations). Gender
# comes from the captions (sbssl.coco documents the word lists and the rule); the attacker is trained on
# the whole table and on the balanced subsets alpha = 1, 2, 3, each with the model's logits when given.
COCO = config["coco"]
CO = f"{R}/leakage/datasets/coco"
COCO_JSONS = ["instances_train2014", "instances_val2014", "captions_train2014", "captions_val2014"]
COCO_DIR = COCO["annotations"] or "data/coco"
COCO_SUBSETS = ["all"] + [f"alpha{a}" for a in COCO["alphas"]]

wildcard_constraints:
    subset="all|alpha[0-9]+",
    alpha=r"[0-9]+",


# Without a local folder (coco.annotations) the archive is fetched where Snakemake runs (internet).
localrules:
    fetch_coco,


rule fetch_coco:
    output:
        expand(f"{COCO_DIR}/{{name}}.json", name=COCO_JSONS),
    params:
        url=COCO["url"],
        lock=COCO["lock"],
    log:
        f"{R}/logs/coco/fetch.log",
    retries: 2
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/fetch_coco.py"


rule coco_annotations:
    input:
        expand(f"{COCO_DIR}/{{name}}.json", name=COCO_JSONS),
    output:
        f"{CO}/all/annotations.csv",
    params:
        seed=COCO["seed"],
        code=code_digest("leakage"),
    resources:
        mem_mb=8000,
    log:
        f"{R}/logs/coco/annotations.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/coco_annotations.py"


rule coco_balanced_subset:
    input:
        f"{CO}/all/annotations.csv",
    output:
        f"{CO}/alpha{{alpha}}/annotations.csv",
    params:
        seed=COCO["seed"],
        code=code_digest("leakage"),
    log:
        f"{R}/logs/coco/alpha{{alpha}}.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/coco_balanced_subset.py"


rule coco_leakage:
    input:
        annotations=f"{CO}/{{subset}}/annotations.csv",
        predictions=COCO["predictions"] or [],
    output:
        report(f"{CO}/{{subset}}/leakage.json", caption="report/coco_leakage.rst", category="Leakage"),
        f"{CO}/{{subset}}/natural_leakage.csv",
    params:
        attacker=COCO["attacker"],
        rounds=COCO["rounds"],
        epochs=COCO["epochs"],
        seed=COCO["seed"],
        code=code_digest("leakage"),
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
        runtime=240,
    log:
        f"{R}/logs/coco/{{subset}}_leakage.log",
    benchmark:
        f"{R}/benchmarks/coco/{{subset}}_leakage.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/coco_leakage.py"
