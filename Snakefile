# sbssl: social-bias audit of vision models (Sirotkin et al. 2022; Steed & Caliskan 2021).
# The DAG: stimuli -> weights -> embeddings (+ similarities) -> permutation tests -> tables ->
# summary, meta-test, figures -> report. Read rules/*.smk for the stages.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/stimuli.smk"
include: "rules/weights.smk"
include: "rules/embed.smk"
include: "rules/tests.smk"
include: "rules/summary.smk"
include: "rules/control.smk"
include: "rules/leakage.smk"
include: "rules/coco.smk"


if config["debias"]["enabled"]:

    include: "rules/debias.smk"


rule all:
    input:
        all_outputs(),
    default_target: True
