# Stage 1: the images. Generated (demo), downloaded (ieat) or a local copy, then one manifest row
# per file with its sha256, so an image that sits in several concept folders is embedded once.
# The download is a local rule: on a cluster it runs where Snakemake runs, which has internet.
localrules:
    fetch_stimuli,


rule demo_stimuli:
    output:
        directory(f"{R}/stimuli/demo"),
    params:
        images_per_concept=config["demo_images_per_concept"],
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
        catalogue=config["catalogue"],
    output:
        MANIFEST,
    params:
        root=stimuli_param,
        skip_bad=config["skip_bad_images"],
        validate_catalogue=True,
    log:
        f"{R}/logs/stimuli/manifest.log",
    benchmark:
        f"{R}/benchmarks/stimuli_manifest.tsv"
    conda:
        "../envs/sbssl.yaml"
    script:
        "../scripts/stimuli_manifest.py"
