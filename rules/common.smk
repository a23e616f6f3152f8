# Config validation, the catalogue and the zoo, and the input functions every stage uses.
# Input functions look up only their own job's wildcards, so adding a model (or a test) changes no
# other job's params and reruns nothing but its own column of the DAG plus the aggregates.
import os
from dataclasses import asdict

from snakemake.utils import validate

from sbssl.catalogue import load_catalogue
from sbssl.layers import LAYERS
from sbssl.models import load_zoo

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
LAYERS_RUN = [layer for layer in LAYERS if layer in config["layers"]]
TESTS = config["tests"] or list(CATALOGUE)
SEEDS = config["seeds"]
CONTROL_MODELS = config["control"]["models"]
CONTROL_TESTS = config["control"]["tests"] or TESTS
MANIFEST = f"{R}/stimuli/manifest.csv"
GENERATED_STIMULI = {"demo": f"{R}/stimuli/demo", "ieat": f"{R}/stimuli/ieat"}


wildcard_constraints:
    model=r"[a-z0-9_]+",
    layer="|".join(LAYERS),
    test=r"[a-z0-9_]+",
    seed=r"\d+",


def stimuli_root():
    """The folder holding <category>/<concept>/<image>: generated, downloaded or a local copy."""
    return GENERATED_STIMULI.get(config["stimuli"], config["stimuli"])


def stimuli_param(wildcards, input):
    """A job's stimuli root: its stimuli input when the workflow made the folder, else the local copy."""
    return input.stimuli or stimuli_root()


def stimuli_input():
    """The stimuli folder as a DAG input when a rule of the workflow makes it; a local copy is used in place."""
    return GENERATED_STIMULI.get(config["stimuli"], [])


def model_spec(wildcards):
    """This job's model only, as a plain dict (Snakemake compares params to decide on reruns)."""
    return asdict(ZOO[wildcards.model])


def weights_input(wildcards):
    """The downloaded checkpoint of a pretrained model; random initialisations need none."""
    return [] if ZOO[wildcards.model].weights is None else f"pretrains/{wildcards.model}.pth"


def test_definition(wildcards):
    """This job's catalogue entry only."""
    return asdict(CATALOGUE[wildcards.test])


def embedding_outputs(prefix):
    """One HDF5 file per configured layer; temporary when the config drops raw embeddings."""
    paths = [f"{prefix}/embeddings/{{model}}/{layer}.h5" for layer in LAYERS_RUN]
    return paths if config["embedding"]["keep_embeddings"] else [temp(p) for p in paths]


def test_results(prefix, models, tests):
    return expand(
        f"{prefix}/tests/{{model}}/{{layer}}/{{test}}/{{seed}}.json",
        model=models,
        layer=LAYERS_RUN,
        test=tests,
        seed=SEEDS,
    )


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
    return outputs


def figure_report(name):
    """A figure for the report; its caption is the .rst the figure job writes beside it."""
    return report(
        f"{R}/figures/{name}.png",
        caption=os.path.abspath(f"{R}/figures/{name}.rst"),
        category="Figures",
    )
