# Stage 1: the images. Generated (demo), downloaded (ieat) or a local copy, then one manifest row
# per file with its sha256, so an image that sits in several concept folders is embedded once.
# A local copy is no job's output: its content fingerprint (rules/common.smk) is a param of the manifest
# job, so changing, adding or removing an image reruns the manifest and everything that depends on it.
# The download is a local rule: on a cluster it runs where Snakemake runs, which has internet.
localrules:
    fetch_stimuli,


rule demo_stimuli:
    output:
        directory(f"{R}/stimuli/demo"),
    params:
        images_per_concept=config["demo_images_per_concept"],
        code=code_digest("stimuli"),
    log:
        f"{R}/logs/stimuli/demo_stimuli.log",
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/demo_stimuli.py"


rule fetch_stimuli:
    output:
        directory(f"{R}/stimuli/ieat"),
    params:
        download=config["stimuli_download"],
    log:
        f"{R}/logs/stimuli/fetch_stimuli.log",
    retries: 2
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/fetch_stimuli.py"


rule stimuli_manifest:
    input:
        stimuli=stimuli_input(),
        # checked against the tree, but a relabelled test must not rerun the manifest
        catalogue=ancient(config["catalogue"]),
    output:
        MANIFEST,
    params:
        root=stimuli_param,
        skip_bad=config["skip_bad_images"],
        validate_catalogue=True,
        fingerprint=STIMULI_FINGERPRINT,
        code=code_digest("stimuli"),
    log:
        f"{R}/logs/stimuli/manifest.log",
    benchmark:
        f"{R}/benchmarks/stimuli_manifest.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/stimuli_manifest.py"
