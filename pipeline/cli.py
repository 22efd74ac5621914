"""Command line: ``tlp VERB ...`` (also ``python -m pipeline``). Parses, calls the API, prints.

Tables and progress go to stderr; machine-readable results go to ``--report``.
Exit codes: 0 ok, 2 bad usage or input (one line saying what and how to fix), 1 failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import TlpInputError

__all__ = ["main"]

logger = logging.getLogger("pipeline")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors also exit 2, on one line
        raise TlpInputError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_extract_options(parser: argparse.ArgumentParser) -> None:
    from .device import PRECISIONS
    from .extract import DEFAULT_LAYERS
    from .models import DEFAULT_MODEL

    parser.add_argument("data", help="folder (one sub-folder per class), CSV manifest (path,label), or 'digits'")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name, e.g. efficientnet_lite0, resnet50:IMAGENET1K_V2 (default: %(default)s)")
    parser.add_argument("--weights", default=None, help="state-dict file, or 'none' for random initialisation (default: the model's own)")
    parser.add_argument("--download", action="store_true", help="let torchvision download missing weights")
    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="presets early,mid,late,penultimate,logits or graph node names (default: %(default)s)")
    parser.add_argument("--pool", default=None, help="avg, max, avgmax, gridK, auto (grid2 for early/mid, avg elsewhere), or LAYER=POOL pairs (default: avg; auto for sweep)")
    parser.add_argument("--image-size", type=_positive_int, default=None, help="crop size fed to the network (default: from the weights)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype (float16 layers that overflow are stored as float32)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes; 0 = threads in this process between forward passes (default: 0 on CPU, up to 8 on CUDA)")
    parser.add_argument("--cache-dir", default="cache", help="cache root (default: %(default)s)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail", help="bad image files: fail (exit 2) or skip and report them")
    parser.add_argument("--commit-every", type=_positive_int, default=256, help="commit finished work at least every N images (default: %(default)s)")
    parser.add_argument("--report", default=None, help="write a JSON report to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or tables")


def _settings_from(args):
    from .extract import ExtractSettings

    return ExtractSettings(
        model=args.model,
        layers=tuple(p.strip() for p in args.layers.split(",") if p.strip()),
        pool=args.pool or ("auto" if args.verb == "sweep" else "avg"),
        image_size=args.image_size,
        precision=args.precision,
        dtype=args.dtype,
        weights=args.weights,
        device=args.device,
        on_error=args.on_error,
        batch_size=args.batch_size,
        workers=args.workers,
        cache_dir=args.cache_dir,
        download=args.download,
        progress=not args.quiet,
        commit_every=args.commit_every,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlp", description="Transfer learning for image classification: extract once, sweep heads, fine-tune when data is large.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    extract = verbs.add_parser("extract", help="cache pooled multi-depth features of a data set")
    _add_extract_options(extract)
    extract.set_defaults(func=_cmd_extract)

    sweep = verbs.add_parser("sweep", help="sweep softmax/SVM/MLP/kNN heads over cached layers")
    _add_extract_options(sweep)
    sweep.add_argument("--heads", default="softmax,svm,mlp,knn", help="heads to sweep (default: %(default)s)")
    selection = sweep.add_mutually_exclusive_group()
    selection.add_argument("--cv", type=_positive_int, default=5, help="stratified K-fold CV on the training part (default: %(default)s)")
    selection.add_argument("--val", type=float, default=None, help="one stratified validation split of this fraction instead of CV")
    sweep.add_argument("--test", default=None, help="test part: a fraction of DATA (stratified, seeded) or a separate data set; never used for selection")
    sweep.add_argument("--out", default=None, help="folder for results.csv")
    sweep.add_argument("--n-jobs", type=int, default=None, help="parallel fits (default: all cores)")
    sweep.add_argument("--no-racing", action="store_true",
                       help="run every fold of every layer x head (default: after 2 folds, stop the ones clearly behind the best)")
    sweep.add_argument("--seed", type=int, default=0, help="seed for splits and heads (default: %(default)s)")
    sweep.set_defaults(func=_cmd_sweep)

    predict = verbs.add_parser("predict", help="label image files with a saved head (or the network's ImageNet labels)")
    predict.add_argument("inputs", nargs="+", help="MODEL_DIR IMAGES... (or IMAGES... with --imagenet)")
    predict.add_argument("--imagenet", action="store_true", help="use the pretrained network's own ImageNet labels")
    predict.add_argument("--model", default=None, help="model for --imagenet (default: efficientnet_lite0)")
    predict.add_argument("--weights", default=None, help="weights file for --imagenet")
    predict.add_argument("--top-k", type=_positive_int, default=None, help="labels per image (default: 1; 5 with --imagenet)")
    predict.add_argument("--out", default=None, help="write path,label,probability rows to this CSV file")
    predict.add_argument("--batch-size", type=_positive_int, default=32)
    predict.add_argument("--device", default="auto")
    predict.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    predict.set_defaults(func=_cmd_predict)

    layers = verbs.add_parser("layers", help="list a model's layer presets and graph nodes")
    layers.add_argument("model", help="model name")
    layers.add_argument("--weights", default=None, help="weights file (default: the model's own if present, else random init)")
    layers.add_argument("--all", action="store_true", help="list every node, not only feature maps at stage ends")
    layers.set_defaults(func=_cmd_layers)

    cache = verbs.add_parser("cache", help="manage the feature cache")
    cache.add_argument("--cache-dir", default="cache", help="cache root (default: %(default)s)")
    actions = cache.add_subparsers(dest="action", required=True, parser_class=_Parser)
    actions.add_parser("ls", help="list cache entries").set_defaults(func=_cmd_cache_ls)
    info = actions.add_parser("info", help="show one entry's attributes and layers")
    info.add_argument("key", help="key or unique prefix")
    info.set_defaults(func=_cmd_cache_info)
    verify = actions.add_parser("verify", help="re-hash entries and check their structure")
    verify.add_argument("key", nargs="?", default=None, help="key or prefix (default: all)")
    verify.set_defaults(func=_cmd_cache_verify)
    remove = actions.add_parser("rm", help="delete one entry")
    remove.add_argument("key", help="key or unique prefix")
    remove.set_defaults(func=_cmd_cache_rm)
    gc = actions.add_parser("gc", help="delete orphaned temporary files, unreadable entries and merged shards")
    gc.add_argument("--partial", action="store_true", help="also delete unfinished work (shards of interrupted runs)")
    gc.set_defaults(func=_cmd_cache_gc)
    for action in ("info", "verify", "rm", "gc", "ls"):  # accept --cache-dir after the action too
        actions.choices[action].add_argument("--cache-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    finetune = verbs.add_parser("finetune", help="fine-tune the network with a new classifier layer (large data, cases 3-4)")
    _add_finetune_options(finetune)
    finetune.set_defaults(func=_cmd_finetune)

    advise = verbs.add_parser("advise", help="measure size and similarity, print the case (1-4) and its recipe")
    _add_planner_options(advise)
    advise.set_defaults(func=_cmd_advise)

    run = verbs.add_parser("run", help="advise, then extract+sweep (cases 1-2) or fine-tune (cases 3-4)")
    _add_planner_options(run)
    _add_run_options(run)
    run.set_defaults(func=_cmd_run)

    demo = verbs.add_parser("demo", help="`tlp run` offline on the built-in digits with the default model")
    demo.add_argument("--cache-dir", default="cache", help="cache root (default: %(default)s)")
    demo.add_argument("--out", default="tlp-demo", help="folder for the plots, results.csv and the saved model (default: %(default)s)")
    demo.add_argument("--report", default=None, help="write a JSON report to this file")
    demo.add_argument("--image-size", type=_positive_int, default=None, help="crop size fed to the network (default: from the weights)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _add_planner_options(parser: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL
    from .plan import LARGE_PER_CLASS

    parser.add_argument("data", help="folder (one sub-folder per class), CSV manifest (path,label), 'digits' or 'photos'")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument("--weights", default=None, help="state-dict file, or 'none' for random initialisation")
    parser.add_argument("--image-size", type=_positive_int, default=None, help="crop size fed to the network (default: from the weights)")
    parser.add_argument("--large-per-class", type=_positive_int, default=LARGE_PER_CLASS,
                        help="images per class (median) from which data counts as large (default: %(default)s)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="extraction precision")
    parser.add_argument("--cache-dir", default="cache", help="cache root (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for samples and splits (default: %(default)s)")
    parser.add_argument("--report", default=None, help="write a JSON report to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or tables")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--test", default=None, help="test part: a fraction of DATA (stratified, seeded) or a separate data set")
    parser.add_argument("--out", default=None, help="folder for plots, results and the saved model (fine-tuning checkpoints too)")
    parser.add_argument("--n-jobs", type=int, default=None, help="parallel head fits (default: all cores)")
    parser.add_argument("--epochs", type=_positive_int, default=10, help="fine-tuning epochs, cases 3-4 (default: %(default)s)")


def _add_finetune_options(parser: argparse.ArgumentParser) -> None:
    from .device import PRECISIONS
    from .finetune import FinetuneSettings
    from .models import DEFAULT_MODEL

    d = FinetuneSettings()
    parser.add_argument("data", help="folder (one sub-folder per class), CSV manifest (path,label), or a built-in name")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name (default: %(default)s)")
    parser.add_argument("--weights", default=None, help="state-dict file, or 'none' for random initialisation")
    parser.add_argument("--test", default=None, help="test part: a fraction of DATA (stratified, seeded) or a separate data set")
    parser.add_argument("--case", choices=("auto", "3", "4"), default="auto",
                        help="3: freeze the first 70%%; 4: train the whole network; auto: measure similarity (default)")
    parser.add_argument("--freeze", default=None, help="fraction of parameterised layers to freeze (0.7), or a module name to freeze up to")
    parser.add_argument("--from-scratch", action="store_true", help="random initialisation instead of pretrained weights (case 4's alternative)")
    parser.add_argument("--epochs", type=_positive_int, default=d.epochs, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate of the new classifier layer, AdamW (default: %(default)s)")
    parser.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult, help="pretrained layers train at lr x this (default: %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    parser.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up before the cosine decay (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="(default: %(default)s)")
    parser.add_argument("--image-size", type=_positive_int, default=None, help="crop size fed to the network (default: from the weights)")
    parser.add_argument("--val", type=float, default=d.val, help="validation fraction for early stopping and best-epoch selection; 0 = none (default: %(default)s)")
    parser.add_argument("--patience", type=_positive_int, default=d.patience, help="epochs without a better validation accuracy before stopping (default: %(default)s)")
    parser.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="(default: %(default)s)")
    parser.add_argument("--no-hflip", action="store_true", help="no random horizontal flips (for text, digits, anything with a handedness)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="auto: bf16 autocast on capable CPUs and CUDA, else fp32")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader decoding processes; 0 = threads between steps (default: 0 on CPU, up to 8 on CUDA)")
    parser.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder for model.pt, model.json, history.csv/png and checkpoints/ (resumable)")
    parser.add_argument("--restart", action="store_true", help="discard checkpoints in --out instead of resuming")
    parser.add_argument("--cache-dir", default="cache", help="cache root for --case auto's measurements (default: %(default)s)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument("--report", default=None, help="write a JSON report to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------- verbs
def _print(text: str = "") -> None:
    print(text, file=sys.stderr)


def _extract_summary(result) -> str:
    from .report import format_table

    rows = [
        [name, info["node"], "x".join(map(str, info["pre_pool_shape"])), info["stride"] or "-",
         info["pooling"], info["dim"], info["dtype"], info["bytes_per_image"]]
        for name, info in result.layers.items()
    ]
    table = format_table(rows, ["layer", "node", "tap shape", "stride", "pool", "dim", "dtype", "bytes/img"])
    rate = f", {result.images_per_second:.1f} img/s" if result.n_extracted else ""
    lines = [
        table,
        "",
        f"{result.n_images} images in cache ({result.n_extracted} extracted, {result.n_reused} reused, "
        f"{len(result.skipped)} skipped) in {result.seconds:.2f} s{rate}",
        f"model {result.model}, precision {result.precision}",
        f"cache file: {result.path}",
    ]
    for skip in result.skipped[:20]:
        lines.append(f"skipped {skip['path']}: {skip['reason']}")
    if len(result.skipped) > 20:
        lines.append(f"... and {len(result.skipped) - 20} more skipped (see --report)")
    return "\n".join(lines)


def _cmd_extract(args) -> int:
    from .extract import extract
    from .report import write_report

    result = extract(args.data, _settings_from(args))
    if args.report:
        write_report(args.report, result.to_report())
    if not args.quiet:
        _print(_extract_summary(result))
    return 0


def _test_argument(value: str | None):
    """``--test 0.5`` is a fraction; anything else names a data set."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _cmd_sweep(args) -> int:
    from .report import write_report
    from .sweep import sweep

    result = sweep(args.data, test=_test_argument(args.test), heads=args.heads, cv=args.cv, val=args.val,
                   n_jobs=args.n_jobs, seed=args.seed, racing=not args.no_racing, out=args.out,
                   settings=_settings_from(args))
    if args.report:
        write_report(args.report, result.to_report())
    if not args.quiet:
        _print(_sweep_summary(result))
    return 0


def _sweep_summary(result) -> str:
    best = result.best
    test = "" if best.get("test_accuracy") is None else f", test accuracy {best['test_accuracy']:.4f}"
    return "\n".join([
        f"cross-validated accuracy ({result.n_train} training images, mean ± std over folds; * = selected):",
        result.table(),
        "",
        f"best: {best['head']} on {best['layer']} with {best['params']}: CV accuracy {best['cv_accuracy']:.4f}{test}"
        f" ({result.n_test} test images)",
        f"timings: extract {result.timings['extract_seconds']:.1f} s, sweep {result.timings['sweep_seconds']:.1f} s",
    ])


def _cmd_predict(args) -> int:
    import csv

    from .models import DEFAULT_MODEL
    from .predict import imagenet_top_k, load_head, predict_files
    from .report import format_table

    if args.imagenet:
        top_k = args.top_k or 5
        rows, skipped = imagenet_top_k(args.model or DEFAULT_MODEL, args.inputs, top_k=top_k, weights=args.weights,
                                       batch_size=args.batch_size, device=args.device, on_error=args.on_error)
    else:
        if len(args.inputs) < 2:
            raise TlpInputError("tlp predict needs MODEL_DIR and at least one image (or --imagenet IMAGES...)")
        if args.model or args.weights:
            raise TlpInputError("--model and --weights go with --imagenet; a saved head names its own model")
        top_k = args.top_k or 1
        saved = load_head(args.inputs[0])
        rows, skipped = predict_files(saved, args.inputs[1:], top_k=top_k, batch_size=args.batch_size,
                                      device=args.device, on_error=args.on_error)
    header = ["path", "label", "probability"] + [f"{name}_{i}" for i in range(2, top_k + 1)
                                                 for name in ("label", "probability")]
    table = [[row["path"]] + [v for pair in zip(row["labels"], row["probabilities"]) for v in pair] for row in rows]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(table)
    _print(format_table([[r[0], r[1], f"{r[2]:.3f}"] for r in table], ["path", "label", "probability"]))
    for skip in skipped:
        _print(f"skipped {skip['path']}: {skip['reason']}")
    return 0


def _finetune_settings(args):
    from .finetune import FinetuneSettings

    return FinetuneSettings(
        model=args.model, weights=args.weights, image_size=args.image_size, case=args.case, freeze=args.freeze,
        from_scratch=args.from_scratch, epochs=args.epochs, lr=args.lr, backbone_lr_mult=args.backbone_lr_mult,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, val=args.val,
        patience=args.patience, label_smoothing=args.label_smoothing, hflip=not args.no_hflip,
        precision=args.precision, device=args.device, workers=args.workers, seed=args.seed,
        on_error=args.on_error, cache_dir=args.cache_dir, progress=not args.quiet,
    )


def _cmd_finetune(args) -> int:
    from .finetune import finetune
    from .report import write_report

    result = finetune(args.data, _finetune_settings(args), test=_test_argument(args.test), out=args.out,
                      restart=args.restart)
    if args.report:
        write_report(args.report, result.to_report())
    if not args.quiet:
        _print(_finetune_summary(result))
    return 0


def _finetune_summary(result) -> str:
    from .report import format_table

    rows = [[row["epoch"], f"{row['train_loss']:.4f}", f"{row['train_accuracy']:.4f}",
             "" if row.get("val_accuracy") is None else f"{row['val_accuracy']:.4f}",
             f"{row['images_per_second'] or 0:.1f}"] for row in result.history]
    recipe = result.recipe
    lines = [
        f"fine-tuned {result.model}: {recipe['n_frozen_layers']} of {recipe['n_layers']} layers frozen "
        f"(--freeze {recipe['freeze']}), backbone lr x{recipe['backbone_lr_mult']}, {recipe['precision']}"
        + (f"; resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""),
        format_table(rows, ["epoch", "train loss", "train acc", "val acc", "img/s"]),
        f"best epoch {result.best_epoch}" + (f", validation accuracy {result.val_accuracy:.4f}" if result.val_accuracy is not None else "")
        + (f", test accuracy {result.test_accuracy:.4f} ({result.n_test} images)" if result.test_accuracy is not None else ""),
    ]
    if result.out is not None:
        lines.append(f"saved {result.out / 'model.pt'}, model.json, history.csv, history.png")
    return "\n".join(lines)


def _cmd_advise(args) -> int:
    from .plan import advise
    from .report import write_report

    advice = advise(args.data, model=args.model, weights=args.weights, image_size=args.image_size,
                    cache_dir=args.cache_dir, large_per_class=args.large_per_class, seed=args.seed,
                    precision=args.precision, progress=not args.quiet)
    if args.report:
        write_report(args.report, advice.to_report())
    _print(advice.summary())
    return 0


def _cmd_run(args) -> int:
    from .report import write_report
    from .run import run

    outcome = run(args.data, test=_test_argument(args.test), model=args.model, weights=args.weights,
                  image_size=args.image_size, cache_dir=args.cache_dir, large_per_class=args.large_per_class,
                  precision=args.precision, seed=args.seed, out=args.out, n_jobs=args.n_jobs, epochs=args.epochs,
                  progress=not args.quiet, say=None if args.quiet else _print)
    if args.report:
        write_report(args.report, outcome.to_report())
    _print(_run_summary(outcome))
    return 0


def _run_summary(outcome) -> str:
    result = outcome.result
    lines = [_sweep_summary(result) if outcome.stage == "sweep" else _finetune_summary(result)]
    test = result.best.get("test_accuracy") if outcome.stage == "sweep" else result.test_accuracy
    if test is not None:
        lines.append(f"case {outcome.advice.case}: test accuracy {test:.4f}")
    if outcome.out is not None:
        lines.append(f"outputs in {outcome.out}/ (plots, results, saved model for `tlp predict {outcome.out} IMAGES...`)")
    return "\n".join(lines)


def _cmd_demo(args) -> int:
    from .report import write_report
    from .run import run

    _print("tlp demo: `tlp run digits --test 0.5` with efficientnet_lite0, offline "
           "(1,797 8x8 digit images: is this data like ImageNet? which case? which layer and head?)")
    outcome = run("digits", test=0.5, image_size=args.image_size, cache_dir=args.cache_dir, out=args.out,
                  progress=not args.quiet, say=_print)
    if args.report:
        write_report(args.report, outcome.to_report())
    _print(_run_summary(outcome))
    return 0


def _cmd_layers(args) -> int:
    from .layers import list_nodes, preset_nodes
    from .models import resolve_model
    from .report import format_table

    try:
        spec = resolve_model(args.model, weights=args.weights)
    except TlpInputError:
        if args.weights is not None:
            raise
        spec = resolve_model(args.model, weights="none")  # the graph does not need real weights
    model = spec.build()
    nodes = list_nodes(spec, model)
    by_node = {info.node: info for info in nodes}
    presets = preset_nodes(spec)
    stage_ends = set(presets.values())
    rows = []
    for preset, node in presets.items():
        info = _node_info(by_node, node)
        rows.append([preset, node, info and "x".join(map(str, info.shape)), info and info.channels, info and (info.stride or "-")])
    _print(f"presets of {spec.name} (shapes for a 128 px input):")
    _print(format_table(rows, ["preset", "node", "shape", "channels", "stride"]))
    _print("")
    shown = [
        info for info in nodes
        if args.all or info.node in stage_ends or info.stride is None or _is_block_output(info.node)
    ]
    _print(f"graph nodes ({len(shown)} of {len(nodes)}; --all lists every node):")
    _print(format_table([[i.node, "x".join(map(str, i.shape)), i.channels, i.stride or "-"] for i in shown],
                        ["node", "shape", "channels", "stride"]))
    return 0


def _node_info(by_node, node):
    if node in by_node:
        return by_node[node]
    inside = [info for name, info in by_node.items() if name.startswith(node + ".")]
    return inside[-1] if inside else None


def _is_block_output(node: str) -> bool:
    # Stage- or block-level modules ("layer3", "features.5", "blocks.4.1") rather than ops inside them.
    parts = node.split(".")
    return len(parts) <= 2 or (len(parts) == 3 and parts[-1].isdigit())


def _cmd_cache_ls(args) -> int:
    from .cache import CacheDir, FeatureFile
    from .report import format_table

    cache = CacheDir(args.cache_dir)
    rows = []
    for path in cache.finished_files():
        try:
            with FeatureFile(path) as features:
                attrs = features.attrs
                rows.append([path.stem[:12], attrs.get("model"), attrs.get("data_name"), features.n_rows(),
                             ",".join(features.layers), f"{path.stat().st_size / 1e6:.1f}", attrs.get("created")])
        except TlpInputError:
            rows.append([path.stem[:12], "UNREADABLE", "", "", "", f"{path.stat().st_size / 1e6:.1f}", ""])
    print(format_table(rows, ["key", "model", "data", "images", "layers", "MB", "created"]))
    return 0


def _cmd_cache_info(args) -> int:
    import json

    from .cache import CacheDir, FeatureFile

    path = CacheDir(args.cache_dir).resolve(args.key)
    with FeatureFile(path) as features:
        info = {
            "path": str(path),
            "attributes": features.attrs,
            "n_images": features.n_rows(),
            "classes": features.classes,
            "n_skipped": len(features.skipped),
            "layers": {
                name: {**{k: v for k, v in features.layer_meta(name).__dict__.items() if k != "name"},
                       "dim": features.dim(name), "dtype": str(features.stored_dtype(name))}
                for name in features.layers
            },
        }
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_cache_verify(args) -> int:
    from .cache import CacheDir, FeatureFile

    cache = CacheDir(args.cache_dir)
    paths = [cache.resolve(args.key)] if args.key else cache.finished_files()
    bad = 0
    for path in paths:
        try:
            with FeatureFile(path) as features:
                problems = features.verify()
        except TlpInputError as error:
            problems = [str(error)]
        bad += bool(problems)
        print(f"{path.stem[:12]}  {'ok' if not problems else 'BAD: ' + '; '.join(problems)}")
    if bad:
        print(f"{bad} of {len(paths)} entries failed verification; remove them with `tlp cache rm KEY`", file=sys.stderr)
        return 1
    return 0


def _cmd_cache_rm(args) -> int:
    from .cache import CacheDir

    path = CacheDir(args.cache_dir).resolve(args.key)
    path.unlink()
    _print(f"removed {path}")
    return 0


def _cmd_cache_gc(args) -> int:
    from .cache import CacheDir

    removed = CacheDir(args.cache_dir).gc(partial=args.partial)
    for path, size in removed:
        _print(f"removed {path} ({size / 1e6:.1f} MB)")
    _print(f"freed {sum(size for _, size in removed) / 1e6:.1f} MB in {len(removed)} files")
    return 0


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (tests call this directly)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            logging.getLogger("pipeline").setLevel(logging.DEBUG)
        return int(args.func(args) or 0)
    except TlpInputError as error:
        print(f"tlp: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlp: interrupted; finished batches are kept, rerun the same command to resume", file=sys.stderr)
        return 130


def main_entry() -> None:
    """Console-script entry point (``tlp``)."""
    sys.exit(main())
