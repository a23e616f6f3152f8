"""The model zoo (``config/models.yaml``), verified weight downloads, checkpoint reading, model building.

A zoo entry (:class:`ModelSpec`) holds labels used at table time and a :class:`ModelDefinition`, the part
that the numbers depend on; jobs get only the latter (:func:`model_definition_dict`). Checkpoints are
trusted on first fetch and pinned: the weights lock (``config/weights.lock``, :func:`read_weights_lock`)
keeps each model's URL and full sha256, and :func:`verify_weights` checks the file (or model folder) on
every use.

A zoo file is validated against ``config/schemas/zoo.schema.yaml`` (JSON schema; its enums are the constants
below) and then by the checks a schema cannot state; errors name the file, the model and the key.

Models come from any library of :data:`SOURCES`; :mod:`sbssl.backbones` (the registry) builds them. The
ResNet-50 checkpoints of the SSL libraries are converted into torchvision's state_dict key names
(:func:`convert_checkpoint`, ``conv1.weight``, ``layer1.0.bn1.running_mean``, ...). Checkpoints are read with
the safetensors library (``.safetensors`` content) or ``torch.load(..., weights_only=True)``: a downloaded
pickle never runs code.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping


from sbssl.io import read_yaml
from sbssl.locks import exclusive, write_digest_lock

if TYPE_CHECKING:  # torch is imported lazily: loading the zoo must stay cheap for the DAG and the figures
    import torch

#: Pretext-task families, in figure order (masked_modeling: MAE, BEiT; autoregressive: iGPT).
FAMILIES = ("geometric", "clustering", "contrastive", "masked_modeling", "autoregressive", "supervised", "random")
META_GROUPS = ("contrastive", "non_contrastive")
#: Model libraries (entries of sbssl.backbones.REGISTRY); ``torchvision`` when an entry names none.
SOURCES = ("torchvision", "timm", "open_clip", "huggingface", "sbssl")
DEFAULT_SOURCE = "torchvision"
#: Checkpoint layouts of the SSL ResNet-50 libraries that :func:`convert_checkpoint` turns into torchvision's.
RESNET_FORMATS = ("mmselfsup", "openselfsup", "vissl", "vissl_converted", "torchvision", "moco", "swav")
#: Every checkpoint format: the ResNet layouts, and each library's own key layout (a Hugging Face model is a
#: folder: config.json and weights).
FORMATS = (*RESNET_FORMATS, "timm", "open_clip", "huggingface", "state_dict")
#: Formats each source accepts.
SOURCE_FORMATS = {
    "torchvision": RESNET_FORMATS,
    "timm": ("timm",),
    "open_clip": ("open_clip",),
    "huggingface": ("huggingface",),
    "sbssl": ("state_dict",),
}
#: How a layer's output becomes one row per image (sbssl.backbones.pool_output).
POOLINGS = ("flatten", "mean", "cls", "tokens_mean", "patch_mean")
#: Preprocessing presets: the image presets of sbssl.embed and the ones that need the model
#: (sbssl.backbones.MODEL_PREPROCESSING: the library's own transform, iEAT's iGPT tokens).
PREPROCESSINGS = ("sbssl", "standard", "model", "igpt")
#: JSON schema of a zoo file (YAML), beside the workflow config's schema.
ZOO_SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schemas" / "zoo.schema.yaml"

_SLUG = re.compile(r"^[a-z0-9_]+$")
_HEX = re.compile(r"^[0-9a-f]+$")
_DEFINITION_KEYS = {"source", "architecture", "weights", "init_seed", "layers", "pooling", "preprocessing"}
#: URL schemes a zoo may name. Not http://: its bytes can be altered in transit, and a checkpoint is code-adjacent.
#: ``hf://<owner>/<name>@<revision>`` is a Hugging Face hub snapshot (a model folder) at a pinned revision.
URL_SCHEMES = ("https://", "file://", "hf://")
_HF_URL = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)@(?P<revision>[\w./-]+)$")


@dataclass(frozen=True)
class WeightsSpec:
    """Where a checkpoint comes from and how to check and read it.

    ``url``: ``https://`` or ``file://`` (a file, or a local model folder for ``huggingface``), or
    ``hf://<owner>/<name>@<revision>`` (a hub snapshot). ``sha256`` is the full digest when known (of the file;
    of a folder, its tree digest, :func:`tree_digests`); ``sha256_prefix`` / ``md5_prefix`` are the digest
    prefixes that publishers put in file names or READMEs. ``format`` is one of :data:`FORMATS`.
    """

    url: str
    format: str
    sha256: str | None = None
    sha256_prefix: str | None = None
    md5_prefix: str | None = None


@dataclass(frozen=True)
class ModelDefinition:
    """Everything a model's numbers depend on, and nothing else: the zoo slug, the library (``source``) and its
    model name (``architecture``), either the checkpoint (``weights``) or the random-init seed (``init_seed``),
    exactly one of them not None, and how embeddings are taken: ``layers`` (ordered (slug, module path) pairs;
    None = the architecture's default, :func:`sbssl.layers.model_layers`), ``pooling`` and ``preprocessing``
    (None = the architecture's default, :func:`sbssl.backbones.embedding_settings`).

    Labels (title, family, meta group, ImageNet accuracy, layer titles) are not part of it: they are read from
    the zoo at table time, so relabelling a model reruns no embedding or test.
    """

    name: str
    architecture: str
    weights: WeightsSpec | None
    init_seed: int | None
    source: str = DEFAULT_SOURCE
    layers: tuple[tuple[str, str], ...] | None = None
    pooling: str | None = None
    preprocessing: str | None = None


@dataclass(frozen=True)
class LayerLabel:
    """Display labels a zoo entry may give a layer: ``title`` and relative ``depth`` in [0, 1] (None = derived)."""

    title: str | None = None
    depth: float | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSpec(ModelDefinition):
    """One zoo entry: its definition (the fields of :class:`ModelDefinition`, positional) and its labels
    (keyword-only): ``title``, ``family``, ``meta_group``, ``imagenet_top1`` and ``layer_labels`` (slug ->
    :class:`LayerLabel` for layers the entry titles itself). ``weights`` is None exactly for random models,
    which have an ``init_seed`` instead."""

    title: str
    family: str
    meta_group: str | None = None
    imagenet_top1: float | None = None
    layer_labels: Mapping[str, LayerLabel] = field(default_factory=dict, compare=False, hash=False)

    @property
    def definition(self) -> ModelDefinition:
        """What this model's numbers depend on: its :class:`ModelDefinition` fields, without the labels."""
        return ModelDefinition(**{f.name: getattr(self, f.name) for f in fields(ModelDefinition)})


def _as_definition(model: ModelSpec | ModelDefinition) -> ModelDefinition:
    return model.definition if isinstance(model, ModelSpec) else model


def _fail(where: str | os.PathLike[str], name: str, key: str, problem: str) -> ValueError:
    return ValueError(f"{where}: model {name!r}, key {key!r}: {problem}")


def _hex_digest(where: str | os.PathLike[str], name: str, key: str, value: Any, length: int | None) -> str | None:
    if value is None:
        return None
    text = str(value).lower()
    if not _HEX.match(text) or (length is not None and len(text) != length) or len(text) < 4:
        want = f"{length} hex digits" if length else "at least 4 hex digits"
        raise _fail(where, name, key, f"{value!r} is not a digest ({want})")
    return text


def _check_name(where: str | os.PathLike[str], name: Any) -> str:
    if not isinstance(name, str) or not _SLUG.match(name):
        raise ValueError(f"{where}: model name {name!r} must be a slug (lower-case letters, digits, _)")
    return name


def zoo_schema() -> dict[str, Any]:
    """The zoo's JSON schema (:data:`ZOO_SCHEMA`, YAML): ``$defs.model`` (a zoo entry) and ``$defs.definition``
    (the defining keys, as in job params)."""
    if not ZOO_SCHEMA.is_file():
        raise FileNotFoundError(f"{ZOO_SCHEMA}: the zoo schema is missing from this checkout")
    return read_yaml(ZOO_SCHEMA, "zoo schema")


@functools.lru_cache(maxsize=4)
def _validator(kind: str) -> Any:
    import jsonschema

    schema = zoo_schema()
    return jsonschema.Draft202012Validator({**schema["$defs"][kind], "$defs": schema["$defs"]})


def _schema_check(where: str | os.PathLike[str], name: str, raw: Any, kind: str) -> None:
    """Validate one entry against ``$defs.<kind>`` of the zoo schema; the first error names the model and key."""
    error = next(iter(_validator(kind).iter_errors(raw)), None)
    if error is None:
        return
    key = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(str(k) for k in set(error.instance) - set(allowed))
        raise _fail(where, name, ".".join(filter(None, [key, extra[0]])), f"unknown key; allowed: {allowed}")
    if error.validator == "required":
        missing = sorted(set(error.validator_value) - set(error.instance))
        raise _fail(where, name, ".".join(filter(None, [key, missing[0]])), "is required")
    if error.validator == "oneOf" and not key:
        raise _fail(where, name, "weights", "give exactly one of weights (pretrained) or init_seed (random)")
    problem = error.message
    if error.schema.get("description") and error.validator in ("pattern", "oneOf", "type"):
        problem += f" (expected: {error.schema['description']})"
    raise _fail(where, name, key or "-", problem)


def _hex(value: Any) -> str | None:
    return None if value is None else str(value).lower()


def _weights_spec(where: str | os.PathLike[str], name: str, source: str, raw: Mapping[str, Any]) -> WeightsSpec:
    """The checks of a ``weights`` mapping that the schema cannot state (it checked keys, types and digests)."""
    url, fmt = str(raw["url"]), str(raw["format"])
    if not url.startswith(URL_SCHEMES):
        raise _fail(
            where, name, "weights.url",
            f"{url!r} is not an https://, file:// or hf:// URL (plain http:// is refused: a download could be "
            "altered in transit)",
        )  # fmt: skip
    if url.startswith("hf://") and (not _HF_URL.match(url) or fmt != "huggingface"):
        raise _fail(where, name, "weights.url",
                    f"{url!r}: a hub snapshot is hf://<owner>/<name>@<revision> (pin a commit) with format huggingface")
    if fmt not in SOURCE_FORMATS[source]:
        raise _fail(where, name, "weights.format",
                    f"{fmt!r} is not a {source} checkpoint format; use one of {list(SOURCE_FORMATS[source])}")
    return WeightsSpec(
        url=url, format=fmt, sha256=_hex(raw.get("sha256")), sha256_prefix=_hex(raw.get("sha256_prefix")),
        md5_prefix=_hex(raw.get("md5_prefix")),
    )  # fmt: skip


@functools.lru_cache(maxsize=1)
def _torchvision_models() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models())


def _definition(where: str | os.PathLike[str], name: str, raw: Mapping[str, Any]) -> ModelDefinition:
    """The definition of a schema-valid entry (or job params), after the checks a schema cannot state."""
    source = str(raw.get("source", DEFAULT_SOURCE))
    architecture = str(raw["architecture"])
    if source == "torchvision" and architecture != "resnet50" and architecture not in _torchvision_models():
        raise _fail(where, name, "architecture",
                    f"{architecture!r} is not a torchvision model (see torchvision.models.list_models())")
    weights = _weights_spec(where, name, source, raw["weights"]) if raw.get("weights") is not None else None
    if raw.get("preprocessing") == "igpt" and source != "huggingface":
        raise _fail(where, name, "preprocessing", "igpt is iEAT's recipe for Hugging Face ImageGPT models")
    layers = raw.get("layers")
    pairs = None
    if layers is not None:
        pairs = tuple((str(slug), str(v["module"] if isinstance(v, Mapping) else v)) for slug, v in layers.items())
    return ModelDefinition(
        name=name, architecture=architecture, weights=weights, init_seed=raw.get("init_seed"), source=source,
        layers=pairs, pooling=raw.get("pooling"), preprocessing=raw.get("preprocessing"),
    )  # fmt: skip


def _model_spec(path: Path, name: Any, raw: Any) -> ModelSpec:
    name = _check_name(path, name)
    if not isinstance(raw, Mapping):
        raise _fail(path, name, "-", "the entry must be a mapping")
    _schema_check(path, name, raw, "model")
    definition = _definition(path, name, raw)
    labels = {
        str(slug): LayerLabel(title=value.get("title"), depth=value.get("depth"))
        for slug, value in (raw.get("layers") or {}).items()
        if isinstance(value, Mapping)
    }
    top1 = raw.get("imagenet_top1")
    return ModelSpec(
        **{f.name: getattr(definition, f.name) for f in fields(ModelDefinition)}, title=str(raw["title"]),
        family=str(raw["family"]), meta_group=raw.get("meta_group"),
        imagenet_top1=None if top1 is None else float(top1), layer_labels=labels,
    )  # fmt: skip


def load_zoo(path: str | os.PathLike[str]) -> dict[str, ModelSpec]:
    """Read and validate a zoo file (top key ``models:``); return ``{name: ModelSpec}`` in file order.

    Entries are checked against the zoo schema (:data:`ZOO_SCHEMA`) and by :func:`_definition`; errors name
    the file, the model and the key at fault; a key repeated within a mapping is refused.
    """
    file = Path(path)
    data = read_yaml(file, "model zoo")
    if not isinstance(data, Mapping) or not isinstance(data.get("models"), Mapping) or not data["models"]:
        raise ValueError(f"{file}: expected a top-level 'models:' mapping of model name -> entry")
    extra = set(data) - {"models"}
    if extra:
        raise ValueError(f"{file}: unknown top-level key(s) {sorted(extra)}; only 'models' is allowed")
    return {str(name): _model_spec(file, name, raw) for name, raw in data["models"].items()}


def model_definition_dict(model: ModelSpec | ModelDefinition) -> dict[str, Any]:
    """The plain, JSON-able form of a model's definition: what the workflow puts in a job's params.

    The defining keys of the zoo entry: ``architecture``; ``weights`` (``{"url", "format"[, "sha256",
    "sha256_prefix", "md5_prefix"]}``) or ``init_seed``; ``source`` unless torchvision; ``layers`` (``{slug:
    module}`` in order), ``pooling`` and ``preprocessing`` when the entry sets them. Absent (None) and default
    values are left out, so an entry written before a key existed keeps its params (a ResNet-50 is
    ``{"architecture": "resnet50", "init_seed": 1}`` as before). The defaults themselves are code
    (sbssl.backbones), covered by the embed stage's code digest. The name is not included: it is the job's
    ``{model}`` wildcard, already in every output path; :func:`model_definition_from_dict` takes it separately.
    """
    definition = _as_definition(model)
    out: dict[str, Any] = {"architecture": definition.architecture}
    if definition.source != DEFAULT_SOURCE:
        out["source"] = definition.source
    if definition.weights is not None:
        out["weights"] = {k: v for k, v in asdict(definition.weights).items() if v is not None}
    if definition.init_seed is not None:
        out["init_seed"] = definition.init_seed
    if definition.layers is not None:
        out["layers"] = dict(definition.layers)
    for key in ("pooling", "preprocessing"):
        if getattr(definition, key) is not None:
            out[key] = getattr(definition, key)
    return out


def model_definition_from_dict(name: str, data: Mapping[str, Any]) -> ModelDefinition:
    """Rebuild and validate a :class:`ModelDefinition` from :func:`model_definition_dict` output and the
    model's name (a job's wildcard). The keys and values are checked as in a zoo file (an unknown key, such
    as a label like ``title``, is an error); errors name the model and the key."""
    where = "model definition (job params)"
    name = _check_name(where, name)
    if not isinstance(data, Mapping):
        raise _fail(where, name, "-", f"expected a mapping, got {type(data).__name__}")
    unknown = set(data) - _DEFINITION_KEYS
    if unknown:
        raise _fail(where, name, sorted(unknown)[0], f"not a defining key; allowed: {sorted(_DEFINITION_KEYS)}")
    _schema_check(where, name, data, "definition")
    return _definition(where, name, data)


# --- the weights lock -----------------------------------------------------------------------------------------

_LOCK_HEADER = """\
# Full sha256 digest of every model checkpoint sbssl has fetched or used, one entry per model, sorted by name.
# Written by sbssl (sbssl.models) on a model's first successful fetch or use; every later fetch and use of
# pretrains/<model>.pth is checked against it, so a replaced or re-published file cannot change results
# unnoticed. Keep this file under version control. To accept a new checkpoint for a model on purpose (a new
# URL in the zoo, a re-published file), delete that model's entry here and fetch again.
"""


@dataclass(frozen=True)
class LockedWeights:
    """One weights-lock entry: the URL a model's checkpoint was fetched from and its full sha256 (hex)."""

    url: str
    sha256: str


def read_weights_lock(path: str | os.PathLike[str]) -> dict[str, LockedWeights]:
    """The weights lock (YAML: ``<model>: {url: ..., sha256: <64 hex>}``); ``{}`` when the file is absent.

    Repeated keys, unknown keys and malformed digests are errors naming the file, the model and the key.
    """
    file = Path(path)
    if not file.exists():
        return {}
    data = read_yaml(file, "weights lock")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{file}: expected a mapping of model name -> {{url, sha256}}")
    entries = {}
    for name, raw in data.items():
        name = _check_name(file, name)
        if not isinstance(raw, Mapping) or set(raw) != {"url", "sha256"}:
            keys = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
            raise _fail(file, name, "-", f"expected exactly the keys ['sha256', 'url'], got {keys}")
        if not isinstance(raw["url"], str) or not raw["url"]:
            raise _fail(file, name, "url", f"{raw['url']!r} is not a URL")
        sha256 = _hex_digest(file, name, "sha256", raw["sha256"], 64)
        entries[name] = LockedWeights(url=raw["url"], sha256=str(sha256))
    return entries


def _checked_entry(definition: ModelDefinition, lock_path: Path, entry: LockedWeights | None) -> LockedWeights | None:
    """``entry`` after checking that it still describes the zoo's checkpoint: same URL, same full sha256."""
    weights = definition.weights
    assert weights is not None
    if entry is None:
        return None
    remedy = (
        f"if the change is deliberate, delete the entry {definition.name!r} from {lock_path} and fetch again; "
        "otherwise restore the zoo entry"
    )
    if entry.url != weights.url:
        raise ValueError(
            f"model {definition.name!r}: the zoo's weights URL {weights.url} differs from the one locked in "
            f"{lock_path} ({entry.url}, sha256 {entry.sha256}); {remedy}"
        )
    if weights.sha256 is not None and weights.sha256 != entry.sha256:
        raise ValueError(
            f"model {definition.name!r}: the zoo's weights sha256 {weights.sha256} differs from the one locked "
            f"in {lock_path} ({entry.sha256}); {remedy}"
        )
    return entry


def _record(definition: ModelDefinition, lock_path: Path, sha256: str) -> None:
    """Add ``definition``'s entry to the lock unless present (then it must agree): under the flock, re-read,
    merge, atomic rewrite, so that concurrent writers each keep the others' entries."""
    from sbssl.download import HashMismatchError

    weights = definition.weights
    assert weights is not None
    with exclusive(lock_path):
        entries = read_weights_lock(lock_path)
        present = _checked_entry(definition, lock_path, entries.get(definition.name))
        if present is not None:
            if present.sha256 != sha256:
                raise HashMismatchError(
                    f"model {definition.name!r}: {lock_path} was meanwhile given sha256 {present.sha256} for "
                    f"{weights.url}, but the file here has {sha256}; delete the file and fetch again"
                )
            return
        entries[definition.name] = LockedWeights(url=weights.url, sha256=sha256)
        write_digest_lock(lock_path, {name: asdict(entry) for name, entry in entries.items()}, _LOCK_HEADER)


def write_weights_lock(
    model: ModelSpec | ModelDefinition, path: str | os.PathLike[str], lock_path: str | os.PathLike[str]
) -> str:
    """Write a weights lock holding only ``model``'s entry: its URL and the full sha256 of ``path``, the
    checkpoint that a job of this workflow has just trained (``sbssl debias``'s ``model.pt``). The file is that
    job's own output, written atomically and replaced when the job reruns; every use of the checkpoint is then
    verified against it by :func:`verify_weights`, as downloaded checkpoints are against the zoo's lock.
    Returns the sha256."""
    from sbssl.download import file_digests

    definition = _as_definition(model)
    weights = _require_weights(definition)
    sha256 = file_digests(Path(path))["sha256"]
    write_digest_lock(lock_path, {definition.name: {"url": weights.url, "sha256": sha256}}, _LOCK_HEADER)
    return sha256


def verify_weights(
    model: ModelSpec | ModelDefinition, path: str | os.PathLike[str], lock_path: str | os.PathLike[str]
) -> str:
    """Check a model's checkpoint file and return its full sha256 (64 lower-case hex digits).

    The file must match every digest the zoo gives (``sha256``, ``sha256_prefix``, ``md5_prefix``) and the
    weights lock's entry for the model (see :func:`read_weights_lock`), whose URL must be the zoo's. A file
    that passes the zoo's digests but has no lock entry yet gets one now: from then on, only that exact file
    is accepted. A model with neither a zoo digest nor a lock entry cannot be checked and is refused until
    :func:`fetch_weights` has downloaded it from the zoo's URL and recorded it.
    Digests come from :func:`sbssl.download.file_digests`, so each version of the file is hashed once.

    This is the one check to call wherever a checkpoint is used. Raises HashMismatchError (a ValueError)
    naming the file, the expected and actual digests and the remedy; ValueError for a random model, an
    unverifiable file, or a zoo entry that disagrees with the lock; FileNotFoundError if the file is absent.
    """
    return _verify(_as_definition(model), Path(path), Path(lock_path), downloaded=False)


def _verify(definition: ModelDefinition, file: Path, lock: Path, *, downloaded: bool) -> str:
    """:func:`verify_weights`; ``downloaded``: ``file`` was just fetched from the zoo's URL, so that with no
    digest known at all it is the first trusted copy and is locked."""
    from sbssl.download import HashMismatchError, digest_problems

    weights = _require_weights(definition)
    if not (file.is_dir() if _is_folder(weights) else file.is_file()):
        raise FileNotFoundError(
            f"checkpoint {file} of model {definition.name!r} not found (fetch it with "
            f"`sbssl fetch-weights --model {definition.name}`)"
        )
    entry = _checked_entry(definition, lock, read_weights_lock(lock).get(definition.name))
    if entry is None and not downloaded and not _zoo_digests(weights):
        raise ValueError(
            f"{file}: model {definition.name!r} has no digest in the zoo and no entry in {lock}, so this file "
            f"cannot be verified; fetch it with `sbssl fetch-weights --model {definition.name}` (downloads it "
            f"and records its sha256 in {lock}), or give its sha256 in the zoo"
        )
    digests = weights_digests(file)
    problems = digest_problems(
        digests, sha256=weights.sha256, sha256_prefix=weights.sha256_prefix, md5_prefix=weights.md5_prefix
    )
    if entry is not None and entry.sha256 != digests["sha256"]:
        problems.append(f"sha256 expected {entry.sha256} (locked in {lock}), got {digests['sha256']}")
    if problems:
        raise HashMismatchError(
            f"{file}: not the checkpoint of model {definition.name!r} ({weights.url}): {'; '.join(problems)}. "
            f"Delete {file} and fetch it again (`sbssl fetch-weights --model {definition.name}`); if the zoo "
            "entry is what is wrong, fix the zoo (and delete the model's lock entry)"
        )
    if entry is None:
        _record(definition, lock, digests["sha256"])
    return digests["sha256"]


def _is_folder(weights: WeightsSpec) -> bool:
    """Hugging Face weights are model folders (config.json + weights files); all others are one file."""
    return weights.format == "huggingface"


def weights_path(model: ModelSpec | ModelDefinition, dest_dir: str | os.PathLike[str] = "pretrains") -> Path:
    """Where :func:`fetch_weights` puts a model's weights: ``<dest_dir>/<name>`` (a folder) for Hugging Face
    models, ``<dest_dir>/<name>.pth`` (a file, whatever its format: safetensors are recognised by content)
    for the others."""
    definition = _as_definition(model)
    weights = _require_weights(definition)
    return Path(dest_dir) / (definition.name if _is_folder(weights) else f"{definition.name}.pth")


def _tree_files(folder: Path) -> list[Path]:
    """The files of a model folder that define it: regular files, sorted, without hidden paths (the hub
    client's ``.cache/``) and without the digest sidecars that sbssl writes beside each file."""
    from sbssl.download import digest_cache_path

    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        source = path.with_name(path.name.removesuffix(".digest.json"))
        if path.name.endswith(".digest.json") and digest_cache_path(source) == path:
            continue
        files.append(path)
    return files


def tree_digests(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``{"sha256", "md5"}`` of a model folder: each digest is taken over the lines ``<file digest>  <relative
    path>`` (POSIX, sorted) of its files (:func:`_tree_files`), the file digests from
    :func:`sbssl.download.file_digests` (hashed once per file version). Renaming, adding, removing or changing
    any file changes it."""
    from sbssl.download import file_digests

    root = Path(folder)
    files = _tree_files(root)
    if not files:
        raise ValueError(f"{root}: empty model folder")
    out = {}
    per_file = {path: file_digests(path) for path in files}
    for algorithm in ("sha256", "md5"):
        text = "".join(f"{per_file[p][algorithm]}  {p.relative_to(root).as_posix()}\n" for p in files)
        out[algorithm] = hashlib.new(algorithm, text.encode()).hexdigest()
    return out


def weights_digests(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{"sha256", "md5"}`` of a weights file, or of a model folder (:func:`tree_digests`)."""
    from sbssl.download import file_digests

    return tree_digests(path) if Path(path).is_dir() else file_digests(path)


def _zoo_digests(weights: WeightsSpec) -> bool:
    return any((weights.sha256, weights.sha256_prefix, weights.md5_prefix))


def _require_weights(definition: ModelDefinition) -> WeightsSpec:
    if definition.weights is None:
        raise ValueError(
            f"model {definition.name!r} is randomly initialised (init_seed {definition.init_seed}); it has no weights"
        )
    return definition.weights


def fetch_weights(
    model: ModelSpec | ModelDefinition,
    dest_dir: str | os.PathLike[str],
    lock_path: str | os.PathLike[str],
    *,
    retries: int = 3,
    timeout: float = 60,
    progress: bool = True,
) -> Path:
    """Download a model's checkpoint to :func:`weights_path` and verify it (:func:`verify_weights`).

    - The zoo's URL must be the one in the weights lock ``lock_path`` (checked before any download).
    - A present file that verifies against the lock or the zoo's digests is returned at once: no network,
      hashed at most once per file version. A present file with nothing to verify it against (no zoo digest,
      no lock entry) is not trusted: the file is downloaded again.
    - A download (:func:`sbssl.download.download`: retries, atomic rename) is checked against the zoo's
      digests and the lock's sha256 before it replaces anything, so a present file that does not verify is
      replaced only by one that does.
    - The first successful fetch of a model records its full sha256 in the lock.
    - A Hugging Face model is a folder: a hub snapshot (``hf://<owner>/<name>@<revision>``, downloaded with
      ``huggingface_hub.snapshot_download`` at that revision; configs, safetensors and pickled weights only)
      or a copy of a local folder (``file://``), fetched into a temporary folder beside the target, checked
      (:func:`tree_digests`), then renamed into place.
    """
    from sbssl.download import HashMismatchError, download

    definition = _as_definition(model)
    weights = _require_weights(definition)
    target, lock = weights_path(definition, dest_dir), Path(lock_path)
    entry = _checked_entry(definition, lock, read_weights_lock(lock).get(definition.name))
    present = target.is_dir() if _is_folder(weights) else target.is_file()
    if present and (entry is not None or _zoo_digests(weights)):
        try:
            _verify(definition, target, lock, downloaded=False)
            return target
        except HashMismatchError:
            pass  # downloaded below; the file is replaced only by one that verifies
    if _is_folder(weights):
        return _fetch_folder(definition, target, lock, entry)
    download(
        weights.url, target, sha256=weights.sha256 or (entry.sha256 if entry else None),
        sha256_prefix=weights.sha256_prefix, md5_prefix=weights.md5_prefix, retries=retries, timeout=timeout,
        progress=progress, keep_present=False,
    )
    _verify(definition, target, lock, downloaded=True)
    return target


#: Files of a hub snapshot that a model needs (no TensorFlow/Flax/ONNX copies of the weights).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.npy", "*.txt", "*.model")


def _fetch_folder(definition: ModelDefinition, target: Path, lock: Path, entry: LockedWeights | None) -> Path:
    """Fetch a model folder (hub snapshot or local copy) beside ``target``, verify it, move it into place."""
    from sbssl.download import HashMismatchError, digest_problems

    weights = _require_weights(definition)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.fetching")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        hub = _HF_URL.match(weights.url)
        if hub:
            from huggingface_hub import snapshot_download

            snapshot_download(
                repo_id=hub.group("repo"), revision=hub.group("revision"), local_dir=staging,
                allow_patterns=list(HUB_PATTERNS),
            )  # fmt: skip
        else:
            source = Path(weights.url.removeprefix("file://"))
            if not source.is_dir():
                raise FileNotFoundError(f"model {definition.name!r}: {weights.url} is not a model folder")
            shutil.copytree(source, staging)
        digests = weights_digests(staging)
        problems = digest_problems(
            digests, sha256=weights.sha256 or (entry.sha256 if entry else None), sha256_prefix=weights.sha256_prefix,
            md5_prefix=weights.md5_prefix,
        )  # fmt: skip
        if problems:
            raise HashMismatchError(
                f"{weights.url}: not the model folder of {definition.name!r}: {'; '.join(problems)}"
            )
        old = target.with_name(f".{target.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staging.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _verify(definition, target, lock, downloaded=True)
    return target

def _strip(state: Mapping[str, Any], prefix: str, *, keep_others: bool) -> dict[str, Any]:
    """Keys starting with ``prefix`` without it; other keys kept as they are or dropped."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            out[key[len(prefix) :]] = value
        elif keep_others:
            out[key] = value
    return out


def _get(obj: Any, keys: tuple[str, ...], fmt: str) -> Any:
    """``obj[k0][k1]...`` with an error naming the missing level."""
    for depth, key in enumerate(keys):
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__
            where = "".join(f"[{k!r}]" for k in keys[:depth]) or "the top level"
            raise ValueError(f"not a {fmt!r} checkpoint: no {key!r} under {where} (found {found})")
        obj = obj[key]
    return obj


def convert_checkpoint(obj: Any, fmt: str) -> dict[str, "torch.Tensor"]:
    """Turn a loaded checkpoint object into a torchvision ResNet-50 state_dict (tensors, torchvision keys).

    Formats (the layouts in ``shared/models/zoo.md``):

    - ``mmselfsup``: MMSelfSup 1.x / mmpretrain algorithm checkpoint, ``{'state_dict': {'backbone.conv1.weight',
      ..., 'neck.*', 'head.*', momentum/target encoders}}``: only ``backbone.*`` is kept, prefix removed.
    - ``openselfsup``: MMSelfSup 0.x / OpenSelfSup backbone file, ``{'state_dict': {'conv1.weight', ...}}``
      (a ``backbone.`` prefix, if present, is handled as for ``mmselfsup``).
    - ``vissl``: VISSL training checkpoint, ``['classy_state_dict']['base_model']['model']['trunk']`` with
      ``_feature_blocks.`` prefixed keys (heads dropped).
    - ``vissl_converted``: ``{'model_state_dict': {'_feature_blocks.conv1.weight', ...}}``.
    - ``torchvision``: a flat state_dict (``fc.*`` included).
    - ``moco``: official MoCo, ``{'state_dict': {'module.encoder_q.*', 'module.encoder_k.*', 'module.queue'}}``:
      the query encoder without its ``fc`` projection head.
    - ``swav``: official SwAV, flat (or under ``'state_dict'``) ``module.*`` keys; ``projection_head.*`` and
      ``prototypes.*`` dropped.

    - ``state_dict``: a flat state dict of an :mod:`sbssl.networks` network (what ``sbssl debias`` writes).
    - ``timm``, ``open_clip``: a state dict in the library's own key layout, flat or under ``'state_dict'``
      (timm's training checkpoints; ``'state_dict_ema'`` and optimiser state are ignored).

    In every format a ``module.`` prefix left by DataParallel is removed. Non-tensor entries are an error.
    (``huggingface`` weights are model folders, read by transformers itself.)
    """
    import torch

    if fmt in ("mmselfsup", "openselfsup", "torchvision", "swav", "timm", "open_clip", "state_dict"):
        state = obj["state_dict"] if isinstance(obj, Mapping) and "state_dict" in obj else obj
    elif fmt == "vissl":
        state = _get(obj, ("classy_state_dict", "base_model", "model", "trunk"), fmt)
    elif fmt == "vissl_converted":
        state = _get(obj, ("model_state_dict",), fmt)
    elif fmt == "moco":
        state = _get(obj, ("state_dict",), fmt)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {list(FORMATS)}")
    if not isinstance(state, Mapping):
        raise ValueError(f"not a {fmt!r} checkpoint: expected a mapping of tensors, got {type(state).__name__}")
    if fmt == "moco":
        state = _strip(state, "module.encoder_q.", keep_others=False)
        if not state:
            raise ValueError("not a 'moco' checkpoint: no 'module.encoder_q.' keys under ['state_dict']")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state = _strip(state, "module.", keep_others=True)
    if fmt in ("mmselfsup", "openselfsup"):
        if any(k.startswith("backbone.") for k in state):
            state = _strip(state, "backbone.", keep_others=False)
        elif fmt == "mmselfsup":
            raise ValueError(f"not a 'mmselfsup' checkpoint: no 'backbone.' keys (found {sorted(state)[:8]})")
    elif fmt in ("vissl", "vissl_converted"):
        state = _strip(state, "_feature_blocks.", keep_others=True)
    elif fmt == "swav":
        state = {k: v for k, v in state.items() if not k.startswith(("projection_head.", "prototypes."))}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{fmt!r} checkpoint has non-tensor entries where weights were expected: {bad[:8]}")
    return dict(state)


class _Inert:
    """Stands in for any non-tensor object class in a checkpoint (logs, numpy metadata): it keeps the
    arguments it is given and runs nothing, so the unpickler never imports or calls code named by the file."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


# torch's weights_only unpickler names the first global it refuses in its error message.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_MAX_INERT_GLOBALS = 64


def _is_safetensors(file: Path) -> bool:
    """True when the file's content is a safetensors file: an 8-byte little-endian header length, then JSON."""
    with open(file, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < file.stat().st_size


def load_checkpoint(path: str | os.PathLike[str], fmt: str) -> dict[str, "torch.Tensor"]:
    """Read a checkpoint on the CPU, then :func:`convert_checkpoint`; errors name the file.

    A safetensors file (recognised by content, whatever its name) is read with the safetensors library; any
    other file with ``torch.load(..., weights_only=True)``.

    Published checkpoints carry training metadata besides the weights (MMSelfSup 1.x keeps mmengine's
    ``message_hub`` log buffers and numpy values). The weights_only unpickler refuses such classes; each
    refused global is then mapped to an inert stand-in (:class:`_Inert`) and the load retried, so the
    tensors load while no code named by the file is ever imported or run. The converted result must
    consist of tensors only, so a stand-in can never end up among the weights.
    """
    import pickle
    import struct

    import torch

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} not found (fetch it with `sbssl fetch-weights`)")
    if fmt not in FORMATS or fmt == "huggingface":
        raise ValueError(f"{file}: cannot read format {fmt!r} as one file; expected one of {list(FORMATS[:-1])}")
    if _is_safetensors(file):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(file, device="cpu")
        except SafetensorError as exc:
            raise ValueError(f"{file}: not a readable safetensors file ({exc}); delete it and fetch again") from exc
        try:
            return convert_checkpoint(obj, fmt)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from exc
    inert: list[tuple[Any, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals(inert):
                obj = torch.load(file, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as exc:
            refused = _REFUSED_GLOBAL.search(str(exc))
            # builtins are printed bare ("getattr") but allowlisted by their full name
            name = "" if refused is None else refused.group(1)
            name = name if "." in name or not name else f"builtins.{name}"
            if not name or len(inert) >= _MAX_INERT_GLOBALS or name in {n for _, n in inert}:
                raise ValueError(
                    f"{file}: refused to unpickle (weights_only=True never runs code from a downloaded file): {exc}"
                ) from exc
            inert.append((_Inert, name))
        except (RuntimeError, EOFError, struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"{file}: not a readable PyTorch checkpoint ({exc}); delete it and fetch again") from exc
    try:
        return convert_checkpoint(obj, fmt)
    except ValueError as exc:
        raise ValueError(f"{file}: {exc}") from exc


def build_model(
    model: ModelSpec | ModelDefinition, weights_path: str | os.PathLike[str] | None = None
) -> "torch.nn.Module":
    """A zoo model in eval mode on the CPU: seeded random init, or ``weights_path`` loaded strictly (the
    module only; :func:`sbssl.backbones.build_backbone` also gives a model preset's transform).

    Random models are the library's own init seeded with ``init_seed``; a classifier absent from a checkpoint
    is initialised with seed 0. Both happen inside a forked RNG, leaving the caller's global torch RNG untouched.
    Missing or unexpected keys and shape mismatches raise ValueError listing the keys by name. The file is
    not hashed here: callers check it with :func:`verify_weights` (once per file version, cached).
    """
    from sbssl.backbones import build_backbone

    return build_backbone(model, weights_path).module
