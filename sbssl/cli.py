"""The ``sbssl`` command: the package's functions outside the Snakemake DAG.

Each subcommand is one ``_cmd_<name>(args) -> int`` function plus one block in :func:`build_parser`.
Heavy imports (torch, pandas) happen inside the ``_cmd_`` functions so ``sbssl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sbssl import __version__


def _cmd_manifest(args: argparse.Namespace) -> int:
    from sbssl.stimuli import build_manifest, distinct_images, write_manifest

    manifest = build_manifest(args.stimuli, skip_bad=args.skip_bad)
    write_manifest(manifest, args.out)
    flags = manifest["status"].str.split(";").explode().value_counts().to_dict()
    print(f"{args.out}: {len(manifest)} files, {len(distinct_images(manifest))} distinct images, {flags}")
    return 0


def _cmd_fetch_weights(args: argparse.Namespace) -> int:
    from sbssl.models import fetch_weights, load_zoo

    zoo = load_zoo(args.zoo)
    names = list(zoo) if args.model == ["all"] else args.model
    unknown = [n for n in names if n not in zoo]
    if unknown:
        raise ValueError(f"model(s) {unknown} not in {args.zoo}; known: {', '.join(zoo)}")
    for name in names:
        if zoo[name].weights is None:
            print(f"{name}: random initialisation (init_seed {zoo[name].init_seed}), nothing to fetch")
            continue
        print(f"{name}: {fetch_weights(zoo[name], args.dest, args.lock, progress=not args.quiet)}")
    return 0


def _cmd_test_embeddings(args: argparse.Namespace) -> int:
    import warnings

    from sbssl.io import atomic_path
    from sbssl.precomputed import StimuliMismatchWarning, run_catalogue

    with warnings.catch_warnings():
        # Mismatches are printed below from the result, once each.
        warnings.simplefilter("ignore", StimuliMismatchWarning)
        df = run_catalogue(
            args.embeddings, args.model, args.catalogue,
            permutations=args.permutations, seed=args.seed, stimuli_root=args.stimuli,
        )  # fmt: skip
    for mismatch in df.attrs["stimuli_mismatches"]:
        print(f"warning: embeddings and stimuli differ for {mismatch.describe()}", file=sys.stderr)
    with atomic_path(args.out) as tmp:
        df.to_csv(tmp, index=False)
    print(f"{args.out}: {len(df)} tests, model {args.model}, {int(df['exact'].sum())} exact p-values")
    return 0


def _cmd_summarize(args: argparse.Namespace) -> int:
    import json

    from sbssl.models import load_zoo
    from sbssl.study import read_results, write_study_summary

    # Published rows name tests by title, so they always need a catalogue; our own table only checks ids.
    catalogue = args.catalogue or ("config/tests.yaml" if args.format == "sbssl-published" else None)
    tests = read_results(args.results, args.format, catalogue=catalogue)
    if args.zoo == "published":
        from sbssl.published import published_zoo

        zoo = published_zoo()
    else:
        zoo = load_zoo(args.zoo)
    paths = write_study_summary(
        tests, zoo, args.out, heatmap_layer=args.heatmap_layer, meta_test_layer=args.meta_test_layer
    )
    meta = json.loads(paths["meta_test"].read_text(encoding="utf-8"))
    print(f"{args.out}: {len(tests)} per-test rows -> {len(paths)} files")
    if meta["n_excluded"] or meta["n_flagged_overlap"]:
        print(f"{meta['n_excluded']} result(s) excluded (see summary.csv `excluded`), "
              f"{meta['n_flagged_overlap']} flagged target_attribute_overlap at {meta['layer']}")
    if meta["p_value"] is None:
        print(f"meta-test not applicable: {meta['not_applicable']}")
    else:
        print(
            f"meta-test at {meta['layer']} (alternative {meta['alternative']}): paper-compatible "
            f"p = {meta['p_value']:.4f} ({meta['n_thresholds']} thresholds), robust "
            f"p = {meta['robust']['p_value']:.4f} ({meta['robust']['n_thresholds']} thresholds), "
            f"area-under-count-curve p = {meta['area_test']['p_value']:.4f}"
        )
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sbssl.embed import embed_model
    from sbssl.layers import model_layer_slugs
    from sbssl.models import load_zoo, weights_path
    from sbssl.similarity import cosine_similarities, similarity_is_current

    zoo = load_zoo(args.zoo)
    if args.model not in zoo:
        raise ValueError(f"model {args.model!r} not in {args.zoo}; known: {', '.join(zoo)}")
    spec = zoo[args.model]
    weights = args.weights
    if spec.weights is not None and weights is None:
        weights = weights_path(spec, "pretrains")
        if not weights.exists():
            raise FileNotFoundError(f"{weights} not found; run `sbssl fetch-weights --model {spec.name}` or pass --weights")
    layers = args.layers or model_layer_slugs(spec)
    out = {layer: Path(args.out_dir) / spec.name / f"{layer}.h5" for layer in layers}
    report = embed_model(
        spec, weights, args.manifest, args.stimuli, out, lock_path=args.lock, layers=layers, preprocessing=args.preprocessing,
        pooling=args.pooling, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        progress=not args.quiet,
    )  # fmt: skip
    state = "all layers cached, nothing computed" if report.cached else f"{report.forward_passes} images embedded"
    print(f"{spec.name}: {report.n_images} distinct images, {state} ({report.seconds:.1f} s on {report.device})")
    for layer in layers:
        line = f"  {layer}: {out[layer]} ({report.bytes_on_disk[layer] / 1e6:.1f} MB)"
        if args.similarity_dir:
            sim = Path(args.similarity_dir) / spec.name / f"{layer}.h5"
            if not similarity_is_current(out[layer], sim):
                cosine_similarities(out[layer], sim)
            line += f", similarity {sim}"
        print(line)
    return 0


def _cmd_leakage(args: argparse.Namespace) -> int:
    from sbssl.leakage import leakage_report, read_annotations, read_predictions, write_leakage
    from sbssl.provenance import provenance

    annotations = read_annotations(args.annotations, args.attribute)
    predictions = read_predictions(args.predictions, annotations) if args.predictions else None
    report = leakage_report(
        annotations, predictions, attribute=args.attribute, attacker=args.attacker, rounds=args.rounds,
        epochs=args.epochs, seed=args.seed,
    )  # fmt: skip
    paths = write_leakage(report, args.out, extra=provenance("leakage"))
    line = f"{paths['json']}: lambda_D = {report.lambda_D.mean:.3f} +- {report.lambda_D.std:.3f}"
    if report.lambda_M is not None:
        line += (f", lambda_M = {report.lambda_M.mean:.3f} +- {report.lambda_M.std:.3f}, model F1 = "
                 f"{report.model_f1:.3f}, amplification = {report.amplification:+.3f}")
    print(f"{line} ({report.attacker} attacker, {report.rounds} rounds)")
    return 0


def _cmd_fetch_coco(args: argparse.Namespace) -> int:
    from sbssl.coco import COCO_ANNOTATIONS_URL, fetch_coco_annotations

    url = args.url or COCO_ANNOTATIONS_URL
    paths = fetch_coco_annotations(args.dest, lock_path=args.lock, url=url, progress=not args.quiet)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_coco_annotations(args: argparse.Namespace) -> int:
    from sbssl.coco import coco_annotations, write_annotations

    table = coco_annotations(
        dict(zip(("train2014", "val2014"), args.instances)), dict(zip(("train2014", "val2014"), args.captions)),
        seed=args.seed,
    )  # fmt: skip
    write_annotations(table, args.out)
    counts = table.groupby(["split", "gender"]).size().to_dict()
    labels = sum(c.startswith("label_") for c in table.columns)
    print(f"{args.out}: {len(table)} images, {labels} labels, " + ", ".join(
        f"{split} {counts.get((split, 'man'), 0)} man / {counts.get((split, 'woman'), 0)} woman"
        for split in ("train", "val", "test")))
    return 0


def _cmd_balanced_subset(args: argparse.Namespace) -> int:
    from sbssl.coco import write_annotations
    from sbssl.leakage import balanced_subset, read_annotations

    annotations = read_annotations(args.annotations, args.attribute)
    subset = balanced_subset(annotations, args.alpha, attribute=args.attribute, seed=args.seed)
    write_annotations(subset, args.out, args.attribute)
    print(f"{args.out}: {len(subset)} of {len(annotations)} images kept "
          f"(no label's {args.attribute} ratio above {args.alpha:g})")
    return 0


def _option_value(text: str) -> tuple[str, object]:
    """``key=value`` of ``--option``; the value is read as YAML (numbers, true/false, null, strings)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes key=value (a DebiasConfig field), got {text!r}")
    return key, yaml.safe_load(value)


def _cmd_debias(args: argparse.Namespace) -> int:
    from sbssl.debias import run_debias

    metrics = run_debias(
        args.dataset, args.method, args.seed, args.out, data=args.data, epochs=args.epochs, device=args.device,
        options=dict(args.option), num_workers=args.workers,
    )  # fmt: skip
    print(f"{args.out}/metrics.json: {args.method} on {args.dataset}, seed {args.seed}: test worst-group accuracy "
          f"{metrics['worst_group_acc']:.3f}, average {metrics['avg_acc']:.3f} (epoch {metrics['best_epoch']} of "
          f"{metrics['epochs']}, chosen by validation worst-group accuracy)")
    if metrics["empty_groups"]:
        print(f"groups without test samples (no accuracy): {', '.join(metrics['empty_groups'])}")
    return 0


def _cmd_fetch_waterbirds(args: argparse.Namespace) -> int:
    from sbssl.debias import fetch_waterbirds
    from sbssl.debias.datasets import WATERBIRDS_URL

    print(fetch_waterbirds(args.dest, args.lock, url=args.url or WATERBIRDS_URL, progress=not args.quiet))
    return 0


def _add_archive_arguments(p: argparse.ArgumentParser, dest: str, dest_help: str, url_help: str) -> None:
    """The options of a subcommand that fetches a data archive against the data lock."""
    p.add_argument("--dest", default=dest, help=f"{dest_help} (default: %(default)s)")
    p.add_argument("--lock", default="config/data.lock", help="data lock: the archive's sha256 (default: %(default)s)")
    p.add_argument("--url", default=None, help=f"https:// or file:// address of {url_help}")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from sbssl.backbones import MODEL_PREPROCESSING
    from sbssl.embed import PREPROCESSING
    from sbssl.models import POOLINGS

    parser = argparse.ArgumentParser(
        prog="sbssl",
        description="Audit vision models for social biases with image embedding association tests (iEAT).",
    )
    parser.add_argument("--version", action="version", version=f"sbssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Subcommand blocks follow; keep one block per command.

    p = sub.add_parser("manifest", help="hash and decode every stimulus image; write the manifest CSV")
    p.add_argument("--stimuli", required=True, help="stimuli root (<category>/<concept>/<image>)")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--skip-bad", action="store_true", help="record unreadable images instead of failing")
    p.set_defaults(func=_cmd_manifest)

    p = sub.add_parser("fetch-weights", help="download and verify model checkpoints from the zoo")
    p.add_argument("--zoo", default="config/models.yaml", help="zoo file (default: %(default)s)")
    p.add_argument("--model", nargs="+", required=True, help="model name(s), or 'all'")
    p.add_argument("--dest", default="pretrains", help="folder for <model>.pth (default: %(default)s)")
    p.add_argument(
        "--lock", default="config/weights.lock", help="weights lock: full sha256 per model (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fetch_weights)

    p = sub.add_parser("test-embeddings", help="run the test catalogue on precomputed iEAT-format embeddings")
    p.add_argument("--embeddings", required=True, help="folder of <category>_<concept>_<model>.csv[.gz] files")
    p.add_argument("--model", required=True, help="model part of the file names, e.g. igpt_l_32")
    p.add_argument("--catalogue", default="config/tests.yaml", help="test catalogue (default: %(default)s)")
    p.add_argument(
        "--permutations", type=int, default=10_000, help="exact if all splits fit, else sampled (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled splits (default: %(default)s)")
    p.add_argument("--stimuli", help="stimuli root: report images missing from the embeddings or vice versa")
    p.add_argument("--out", required=True, help="CSV to write, one row per test")
    p.set_defaults(func=_cmd_test_embeddings)

    p = sub.add_parser("embed", help="embed the distinct stimuli with one model: all layers in one pass, HDF5 cache")
    p.add_argument("--manifest", required=True, help="stimuli manifest CSV (from `sbssl manifest`)")
    p.add_argument("--stimuli", required=True, help="stimuli root the manifest paths are relative to")
    p.add_argument("--model", required=True, help="model name in the zoo")
    p.add_argument("--zoo", default="config/models.yaml", help="zoo file (default: %(default)s)")
    p.add_argument("--weights", help="checkpoint file or model folder (default: where fetch-weights puts it; none for random models)")
    p.add_argument("--lock", default="config/weights.lock", help="weights lock the checkpoint is verified against (default: %(default)s)")
    p.add_argument("--out-dir", required=True, help="writes OUT_DIR/<model>/<layer>.h5 (e.g. results/embeddings)")
    p.add_argument("--layers", nargs="+", help="layer slugs to capture (default: all of the model's layers)")
    p.add_argument("--preprocessing", choices=(*PREPROCESSING, *MODEL_PREPROCESSING), help="default: the model's own")
    p.add_argument("--pooling", choices=POOLINGS, help="default: the model's own")
    p.add_argument("--dtype", default="float32", choices=("float16", "float32"), help="stored type (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0, ... (default: %(default)s)")
    p.add_argument("--similarity-dir", help="also write SIMILARITY_DIR/<model>/<layer>.h5 cosine similarities")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("summarize", help="summary table, bias counts, meta-test and figures from per-test results")
    p.add_argument(
        "--results", required=True,
        help="per-test CSV, optionally gzipped (one row per model, layer, test, seed); the SB-SSL authors' "
        "rows ship in the checkout as data/published/sbssl_published_results.csv.gz",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=["sbssl", "sbssl-published"], default="sbssl",
        help="sbssl: our tests.csv; sbssl-published: the SB-SSL authors' rows (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--zoo", default="config/models.yaml",
        help="model zoo file, or 'published' for the paper's own model labels (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--catalogue", help="test catalogue (default: config/tests.yaml for sbssl-published, none otherwise)"
    )
    p.add_argument("--heatmap-layer", default="avgpool", help="layer of the d heat map (default: %(default)s)")
    p.add_argument("--meta-test-layer", default="avgpool", help="layer of the meta-test (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for summary.csv, counts.csv, meta_test.json, figures/")
    p.set_defaults(func=_cmd_summarize)

    p = sub.add_parser("leakage", help="dataset leakage, model leakage and bias amplification (Wang et al. 2019)")
    p.add_argument(
        "--annotations", required=True,
        help="ANN.csv: image_id, split (train/val/test), the attribute column, one 0/1 column per label_<name>",
    )  # fmt: skip
    p.add_argument("--predictions", help="PRED.csv: image_id and the same label_<name> columns holding logits")
    p.add_argument("--attribute", default="gender", help="attribute column, two values (default: %(default)s)")
    p.add_argument("--out", required=True, help="folder for leakage.json, natural_leakage.csv and its figure")
    p.add_argument("--attacker", choices=["mlp", "logistic"], default="logistic",
                   help="mlp: Wang et al.'s network (GPU when present); logistic: fast (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="balanced subsamples averaged (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=100, help="MLP attacker epochs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsamples and attackers (default: %(default)s)")
    p.set_defaults(func=_cmd_leakage)

    p = sub.add_parser("fetch-coco", help="download the COCO 2014 annotation archive (sha256 pinned), extract its JSONs")
    _add_archive_arguments(p, "data/coco", "folder for the archive and the JSONs", "annotations_trainval2014.zip "
                           "(default: the official one, sbssl.coco.COCO_ANNOTATIONS_URL)")
    p.set_defaults(func=_cmd_fetch_coco)

    p = sub.add_parser("coco-annotations", help="COCO 2014 gender annotations table (ANN.csv) from the official JSONs")
    p.add_argument("--instances", nargs=2, required=True, metavar=("TRAIN", "VAL"),
                   help="instances_train2014.json and instances_val2014.json, in this order")
    p.add_argument("--captions", nargs=2, required=True, metavar=("TRAIN", "VAL"),
                   help="captions_train2014.json and captions_val2014.json, in this order")
    p.add_argument("--out", required=True, help="ANN.csv to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the val2014 -> val/test cut (default: %(default)s)")
    p.set_defaults(func=_cmd_coco_annotations)

    p = sub.add_parser("balanced-subset", help="the images kept so that no label's attribute ratio exceeds alpha")
    p.add_argument("--annotations", required=True, help="ANN.csv to subsample")
    p.add_argument("--alpha", type=float, required=True, help="largest allowed ratio, >= 1 (Wang et al.: 1, 2, 3)")
    p.add_argument("--attribute", default="gender", help="attribute column, two values (default: %(default)s)")
    p.add_argument("--out", required=True, help="ANN_alpha.csv to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the tie-breaks (default: %(default)s)")
    p.set_defaults(func=_cmd_balanced_subset)

    p = sub.add_parser("debias", help="train one debiasing run (data set, method, seed): metrics.json and model.pt")
    p.add_argument("--dataset", required=True, choices=["colored-digits", "waterbirds", "celeba"],
                   help="colored-digits is embedded (no download); the others read --data")
    p.add_argument("--method", required=True, choices=["erm", "groupdro", "adversarial", "clusterfix"])
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="run folder: metrics.json, model.pt (backbone weights only), heads.pt; "
                   "checkpoint.pt while it runs (a rerun resumes from it)")
    p.add_argument("--data", default=None, help="the data set's folder: Waterbirds' (with metadata.csv, see "
                   "`sbssl fetch-waterbirds`), CelebA's (list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/)")
    p.add_argument("--epochs", type=int, default=None, help="default: the data set's (sbssl.debias.default_config)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding workers for file data sets (default: 0)")
    p.add_argument("--option", type=_option_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting of sbssl.debias.DebiasConfig, e.g. adv_lambda=2 or cf_variant=readme "
                   "(repeatable)")
    p.set_defaults(func=_cmd_debias)

    p = sub.add_parser("fetch-waterbirds", help="download the Waterbirds archive (sha256 locked on first fetch), extract it")
    _add_archive_arguments(p, "data/waterbirds", "folder for the archive and the data",
                           "the archive (default: sbssl.debias.datasets.WATERBIRDS_URL)")
    p.set_defaults(func=_cmd_fetch_waterbirds)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"sbssl {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
