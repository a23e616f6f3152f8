# Config validation, the catalogue and the zoo, and the input functions every stage uses.
#
# What reruns a job is exactly what defines its numbers, nothing else:
# - params carry the definition of each result: the model's definition (architecture, weights, init seed;
#   never its title, family or other labels, which are joined at table time), the embedding settings
#   that change values (preprocessing, pooling, dtype), the test's image sets, permutations,
#   alternative, and the digest of the sbssl code the stage runs (sbssl.provenance: Snakemake's own code
#   trigger does not see an imported package);
# - input functions look up only their own job's wildcards, so adding a model or a test changes no other
#   job's params;
# - a test job's seeds are its output files (seed_results), not a param: removing a seed reruns nothing,
#   adding one reruns each test job (rules/tests.smk says why they share a job);
# - the embedding job covers every layer of the model and writes the similarity matrices itself
#   (rules/embed.smk), so selecting another layer or keeping/dropping the embeddings reruns nothing
#   that is finished.
import os
from dataclasses import asdict

from snakemake.utils import validate

from sbssl.catalogue import load_catalogue
from sbssl.io import read_yaml
from sbssl.layers import model_layer_slugs
from sbssl.models import load_zoo, model_definition_dict, weights_path
from sbssl.provenance import code_digest
from sbssl.stimuli import scan_fingerprint

# `--use-conda` jobs install this checkout's sbssl from envs/sbssl.post-deploy.sh, which finds it here.
os.environ.update(SBSSL_ROOT=str(workflow.basedir))

# Snakemake's YAML loader keeps the last of two equal keys; a config with a repeated key is refused.
for _configfile in workflow.configfiles:
    read_yaml(_configfile, "workflow config")

validate(config, "../config/schemas/config.schema.yaml", set_default=True)

R = config["results"].rstrip("/")
ZOO = load_zoo(config["zoo"])
CATALOGUE = {spec.id: spec for spec in load_catalogue(config["catalogue"])}


def _check_names(kind, names, known, where):
    unknown = [n for n in names if n not in known]
    if unknown:
        raise WorkflowError(
            f"config key {kind!r} names {unknown}, which {where} does not define; "
            f"known: {sorted(known)}"
        )


_check_names("models", config["models"], ZOO, config["zoo"])
_check_names("tests", config["tests"], CATALOGUE, config["catalogue"])
_check_names("control.models", config["control"]["models"], ZOO, config["zoo"])
_check_names("control.tests", config["control"]["tests"], CATALOGUE, config["catalogue"])
MODELS = config["models"]
CONTROL_MODELS = config["control"]["models"]
# Each model's layers come from its zoo entry (or its architecture's default); the embedding job covers
# all of them, and `layers:` (optional) selects the ones tested.
MODEL_LAYERS = {m: model_layer_slugs(ZOO[m]) for m in dict.fromkeys(MODELS + CONTROL_MODELS)}
ALL_LAYERS = list(dict.fromkeys(layer for layers in MODEL_LAYERS.values() for layer in layers))
_check_names("layers", config.get("layers", []), ALL_LAYERS, "the models' layers")
_check_names("summary.heatmap_layer", [config["summary"]["heatmap_layer"]], ALL_LAYERS, "the models' layers")
_check_names("summary.meta_test_layer", [config["summary"]["meta_test_layer"]], ALL_LAYERS, "the models' layers")


def tested_layers(model):
    """The layers of ``model`` that are tested: all of them, or those `layers:` names."""
    return [layer for layer in MODEL_LAYERS[model] if layer in config.get("layers", MODEL_LAYERS[model])]


TESTS = config["tests"] or list(CATALOGUE)
SEEDS = config["seeds"]
CONTROL_TESTS = config["control"]["tests"] or TESTS
MANIFEST = f"{R}/stimuli/manifest.csv"
GENERATED_STIMULI = {"demo": f"{R}/stimuli/demo", "ieat": f"{R}/stimuli/ieat"}
LOCAL_STIMULI = None if config["stimuli"] in GENERATED_STIMULI else config["stimuli"]
# Only the settings that change the embedding values define results; batch_size and device are
# execution settings, read by the job from the config and recorded in each file.
EMBEDDING_DEFINITION = {key: config["embedding"][key] for key in ("preprocessing", "pooling", "dtype")}
WEIGHTS_LOCK = config["weights_lock"]


wildcard_constraints:
    model=r"[a-z0-9_]+",
    layer=r"[a-z0-9_]+",
    test=r"[a-z0-9_]+",
    seed=r"\d+",


def stimuli_root():
    """The folder holding <category>/<concept>/<image>: generated, downloaded or a local copy."""
    return GENERATED_STIMULI.get(config["stimuli"], config["stimuli"])


if LOCAL_STIMULI is not None:
    # A local tree is used in place (no job makes it): check the catalogue's folders against it by the
    # scan's own rules before any job runs, and fingerprint its content (sizes and mtimes first, hashes
    # only where they changed) so that the manifest job reruns exactly when an image changes.
    try:
        load_catalogue(config["catalogue"], stimuli_root=LOCAL_STIMULI)
        STIMULI_FINGERPRINT = scan_fingerprint(LOCAL_STIMULI, cache_path=f"{R}/stimuli/.scan_cache.json")
    except (OSError, ValueError) as exc:
        raise WorkflowError(f"config key 'stimuli' = {LOCAL_STIMULI!r}: {exc}") from None
else:
    STIMULI_FINGERPRINT = None


def stimuli_param(wildcards, input):
    """A job's stimuli root: its stimuli input when the workflow made the folder, else the local copy."""
    return input.stimuli or stimuli_root()


def stimuli_input():
    """The stimuli folder as a DAG input when a rule of the workflow makes it; a local copy is used in place."""
    return GENERATED_STIMULI.get(config["stimuli"], [])


def model_definition(wildcards):
    """What defines this job's model's numbers: architecture, weights (URL, format, digests), init seed."""
    return model_definition_dict(ZOO[wildcards.model])


# Checkpoints trained by this workflow (rules/debias.smk): model -> (weights file, the lock its job wrote).
TRAINED_WEIGHTS = {}


def weights_input(wildcards):
    """The downloaded checkpoint of a pretrained model (a file, or a folder for Hugging Face models), or
    the one a job of this workflow trained; random initialisations need none."""
    if wildcards.model in TRAINED_WEIGHTS:
        return TRAINED_WEIGHTS[wildcards.model][0]
    spec = ZOO[wildcards.model]
    return [] if spec.weights is None else str(weights_path(spec, "pretrains"))


def weights_lock_input(wildcards):
    """The lock written by the job that trained this model's checkpoint (none for zoo checkpoints)."""
    return TRAINED_WEIGHTS[wildcards.model][1] if wildcards.model in TRAINED_WEIGHTS else []


def weights_lock(wildcards, input):
    """The lock that this job's checkpoint is verified against: its training job's, else the zoo's."""
    return input.lock or WEIGHTS_LOCK


def weights_definition(wildcards):
    """What the download depends on: the source, the architecture and the weights entry (not the layers,
    pooling or preprocessing, which change the embeddings, not the file)."""
    definition = model_definition_dict(ZOO[wildcards.model])
    return {key: definition[key] for key in ("source", "architecture", "weights") if key in definition}


def only_names(names):
    """A wildcard constraint matching exactly these names (none: matches nothing)."""
    return "|".join(names) if names else "(?!)"


# Hugging Face models are fetched as a folder (a hub snapshot), the others as one file.
_PRETRAINED = [m for m, spec in ZOO.items() if spec.weights is not None]
FOLDER_WEIGHTS = [m for m in _PRETRAINED if weights_path(ZOO[m], "pretrains").suffix != ".pth"]
FILE_WEIGHTS = [m for m in _PRETRAINED if m not in FOLDER_WEIGHTS]


def test_sets(test):
    """A test's id and image sets: what defines its numbers (title and group are joined at table time)."""
    spec = CATALOGUE[test]
    return {"id": spec.id, "x": spec.x, "y": spec.y, "a": spec.a, "b": spec.b}


def test_definition(wildcards):
    """This job's test only."""
    return test_sets(wildcards.test)


# The pixel-permutation control (rules/control.smk) writes under C; its embeddings also depend on which
# images are permuted.
C = f"{R}/control"


def control_definition():
    """What the control's permutation depends on: the control tests' image sets and the seed."""
    return {
        "tests": [test_sets(t) for t in CONTROL_TESTS],
        "seed": config["control"]["seed"],
    }


def embedding_outputs(prefix):
    """The folder of a model's embeddings, one HDF5 file per layer (a folder: models differ in their
    layers); temporary when the config drops raw embeddings."""
    folder = directory(f"{prefix}/embeddings/{{model}}")
    return folder if config["embedding"]["keep_embeddings"] else temp(folder)


def similarity_outputs(prefix):
    """The folder of a model's similarity matrices, one HDF5 file per layer, restored if a rerun fails."""
    return update(directory(f"{prefix}/similarity/{{model}}"))


def layer_file(wildcards, input):
    """This job's layer's file in the model's similarity folder."""
    return f"{input.similarity}/{wildcards.layer}.h5"


def model_layer_list(wildcards):
    """This job's model's layers (all of them: the embedding job covers every layer)."""
    return MODEL_LAYERS[wildcards.model]


def seed_results(prefix):
    """A (model, layer, test) job's result files under ``prefix``, one per seed of the config, in its order."""
    return [f"{prefix}/tests/{{model}}/{{layer}}/{{test}}/{seed}.json" for seed in SEEDS]


def test_results(prefix, models, tests):
    return [
        f"{prefix}/tests/{model}/{layer}/{test}/{seed}.json"
        for model in models
        for layer in tested_layers(model)
        for test in tests
        for seed in SEEDS
    ]


def all_outputs():
    outputs = [
        f"{R}/tables/tests.csv",
        f"{R}/tables/summary.csv",
        f"{R}/tables/counts.csv",
        f"{R}/meta_test.json",
        f"{R}/figures/bias_counts.png",
    ]
    if CONTROL_MODELS:
        outputs.append(f"{R}/tables/control.csv")
    if config["paper_study"]["enabled"]:
        outputs.append(f"{R}/paper/meta_test.json")
    if config["probes"]["enabled"]:
        outputs.append(f"{R}/tables/leakage.csv")
    if config["debias"]["enabled"]:
        outputs.append(f"{R}/tables/debias.csv")
        if config["debias"]["audit"]:
            outputs.append(f"{R}/tables/debias_audit.csv")
    if config["coco"]["enabled"]:
        subsets = ["all"] + [f"alpha{a}" for a in config["coco"]["alphas"]]
        outputs += [f"{R}/leakage/datasets/coco/{s}/leakage.json" for s in subsets]
    return outputs


def figure_report(prefix, name, category="Figures"):
    """A figure for the report; its caption is the .rst the figure job writes beside it."""
    return report(
        f"{prefix}/figures/{name}.png",
        caption=os.path.abspath(f"{prefix}/figures/{name}.rst"),
        category=category,
    )


# The debiasing branch (rules/debias.smk, included when debias.enabled): its settings and input functions.
# sbssl.debias is imported only when they run (it loads torch).
D = config["debias"]
DB = f"{R}/debias"


def _init_options(dataset):
    """A ResNet-50 backbone starts from the checkpoint of the zoo model debias.init_model (None: random)."""
    from sbssl.debias.train import default_config

    if default_config(dataset)["backbone"] != "resnet50" or D["init_model"] is None:
        return {}
    _check_names("debias.init_model", [D["init_model"]], ZOO, config["zoo"])
    spec = ZOO[D["init_model"]]
    if spec.weights is None or spec.architecture != "resnet50":
        raise WorkflowError(f"config key 'debias.init_model': {D['init_model']!r} is not a pretrained ResNet-50")
    return {"init_weights": str(weights_path(spec, "pretrains")), "init_format": spec.weights.format}


def debias_settings(dataset):
    """Every setting of a data set's runs (sbssl.debias.DebiasConfig): defaults, init_model, debias.options."""
    from sbssl.debias.train import make_config

    try:
        options = {**_init_options(dataset), **D["options"].get(dataset, {})}
        return asdict(make_config(dataset, epochs=D["epochs"], options=options))
    except (TypeError, ValueError) as exc:
        raise WorkflowError(f"config key 'debias.options.{dataset}' (or 'debias.epochs'): {exc}") from None


def debias_data_input(wildcards):
    """The data set's metadata when a rule of the workflow fetches it (Waterbirds without a local folder)."""
    if wildcards.dataset == "waterbirds" and "waterbirds" not in D["data"]:
        return f"{WATERBIRDS_DIR}/metadata.csv"
    return []


def debias_init_input(wildcards):
    """The initial backbone's checkpoint (fetched by rules/weights.smk), if the data set's backbone takes one."""
    return DEBIAS_SETTINGS[wildcards.dataset]["init_weights"] or []


def debias_init_model(wildcards):
    """The definition of the zoo model whose checkpoint initialises the backbone (verified by the job)."""
    if not DEBIAS_SETTINGS[wildcards.dataset]["init_weights"]:
        return None
    return {"name": D["init_model"], **model_definition_dict(ZOO[D["init_model"]])}


def debias_run_folder(run):
    """A training run's folder: metrics.json, model.pt, weights.lock (checkpoint.pt while it runs)."""
    return f"{DB}/{run.dataset}/{run.method}/{run.seed}"
