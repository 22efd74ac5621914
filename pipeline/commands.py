"""The verbs of the command line: build settings from the parsed options, call the API,
print the results on stdout (or the JSON report with ``--json``).

Each function takes the ``argparse.Namespace`` of its verb and returns the exit code.
Messages that are not results (skipped files, where outputs went) are logged, so
``-q`` hides them; tables, predictions and reports are printed, so ``-q`` never does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys

from .data import parse_test
from .errors import TlpInputError
from .report import format_table
from .settings import DEFAULT_MODEL, ExtractSettings, FinetuneSettings, ModelOptions, PlanSettings, SweepSettings

logger = logging.getLogger("tlp.cli")


def _print(text: str = "") -> None:
    print(text, file=sys.stdout)


def _values(args, classes) -> dict:
    """The options of ``args`` that are fields of ``classes`` (absent ones keep their
    stage's default), with ``progress`` from ``-q``."""
    names = {item.name for cls in classes for item in dataclasses.fields(cls)}
    values = {name: value for name, value in vars(args).items() if name in names}
    if "progress" in names:
        values["progress"] = not args.quiet
    return values


def _settings(args, cls):
    return cls(**_values(args, (cls,)))


def _finish(args, report: dict, text: str) -> int:
    """--report FILE, then the report (--json) or the table on stdout."""
    from .files import write_json

    if getattr(args, "report", None):
        write_json(args.report, report)
    _print(json.dumps(report, indent=2) if args.json else text)
    return 0


# ----------------------------------------------------------------------------- extract
def _extract_summary(result) -> str:
    rows = [
        [name, info["node"], "x".join(map(str, info["pre_pool_shape"])), info["stride"] or "-",
         info["pooling"], info["dim"], info["dtype"], info["bytes_per_image"]]
        for name, info in result.layers.items()
    ]
    table = format_table(rows, ["layer", "node", "tap shape", "stride", "pool", "dim", "dtype", "bytes/img"])
    rate = f", {result.images_per_second:.1f} img/s" if result.n_extracted else ""
    lines = [
        table, "",
        f"{result.n_images} images in cache ({result.n_extracted} extracted, {result.n_reused} reused, "
        f"{len(result.skipped)} skipped) in {result.seconds:.2f} s{rate}",
        f"model {result.model}, precision {result.precision}",
        f"cache file: {result.path}",
    ]
    lines += [f"skipped {skip['path']}: {skip['reason']}" for skip in result.skipped[:20]]
    if len(result.skipped) > 20:
        lines.append(f"... and {len(result.skipped) - 20} more skipped (see --report)")
    return "\n".join(lines)


def _unfinished_summary(result, data: str) -> str:
    return "\n".join([
        f"part {result.shard} done: {result.n_extracted} images extracted, {result.n_reused} rows reused; "
        f"{result.n_missing} of {result.n_images} images (other parts) have no rows yet",
        "the rank that finishes last assembles the cache file; once every part is done, "
        f"`tlp cache assemble {data}` with the same options does it too",
    ])


def extract(args) -> int:
    from ._extract import extract as run_extract

    settings = _settings(args, ExtractSettings)
    if settings.shard is None:  # the command line follows a launcher's ranks (torchrun, srun) by default
        settings = dataclasses.replace(settings, shard="auto")
    result = run_extract(args.data, settings)
    summary = _extract_summary(result) if result.complete else _unfinished_summary(result, args.data)
    return _finish(args, result.to_report(), summary)


def cache_assemble(args) -> int:
    from ._extract import assemble

    result = assemble(args.data, _settings(args, ExtractSettings))
    return _finish(args, result.to_report(), _extract_summary(result))


# ----------------------------------------------------------------------------- sweep
def _sweep_summary(result) -> str:
    best = result.best
    test = "" if best.get("test_accuracy") is None else f", test accuracy {best['test_accuracy']:.4f}"
    return "\n".join([
        f"cross-validated accuracy ({result.n_train} training images, mean ± std over folds; * = selected):",
        result.table(), "",
        f"best: {best['head']} on {best['layer']} with {best['params']}: CV accuracy {best['cv_accuracy']:.4f}{test}"
        f" ({result.n_test} test images)",
        f"timings: extract {result.timings['extract_seconds']:.1f} s, sweep {result.timings['sweep_seconds']:.1f} s",
    ])


def _one_process(verb: str) -> None:
    """``verb`` runs as one process: started as a launcher's rank, every copy would repeat
    the whole of it and write the same outputs."""
    from .launch import launcher_shard

    shard = launcher_shard()
    if shard is not None:
        raise TlpInputError(f"tlp {verb} runs as one process, not as rank {shard} of a launch: run `tlp extract` "
                            f"(and `tlp finetune`) under torchrun/srun, then `tlp {verb}` once; it reuses the cache")


def sweep(args) -> int:
    from ._sweep import sweep as run_sweep

    _one_process("sweep")
    result = run_sweep(args.data, _settings(args, SweepSettings), test=parse_test(args.test), out=args.out,
                       extraction=_settings(args, ExtractSettings))
    return _finish(args, result.to_report(), _sweep_summary(result))


# ----------------------------------------------------------------------------- finetune
def _finetune_summary(result) -> str:
    rows = [[row["epoch"], f"{row['train_loss']:.4f}", f"{row['train_accuracy']:.4f}",
             "" if row.get("val_accuracy") is None else f"{row['val_accuracy']:.4f}",
             f"{row['images_per_second'] or 0:.1f}"] for row in result.history]
    recipe = result.recipe
    lines = [
        f"fine-tuned {result.model}: {recipe['n_frozen_layers']} of {recipe['n_layers']} layers frozen "
        f"(--freeze {recipe['freeze']}), backbone lr x{recipe['backbone_lr_mult']}, {recipe['precision']}"
        + (f"; resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""),
        format_table(rows, ["epoch", "train loss", "train acc", "val acc", "img/s"]),
        f"best epoch {result.best_epoch}"
        + (f", validation accuracy {result.val_accuracy:.4f}" if result.val_accuracy is not None else "")
        + (f", test accuracy {result.test_accuracy:.4f} ({result.n_test} images)"
           if result.test_accuracy is not None else ""),
    ]
    if result.out is not None:
        lines.append(f"saved {result.out / 'model.json'} (and the weights it names), history.csv, history.png")
    return "\n".join(lines)


def finetune(args) -> int:
    from .finetuning.stage import finetune as run_finetune

    result = run_finetune(args.data, _settings(args, FinetuneSettings), test=parse_test(args.test), out=args.out)
    if result.rank:  # one of several ranks: rank 0 reports for all
        return 0
    return _finish(args, result.to_report(), _finetune_summary(result))


# ----------------------------------------------------------------------------- advise, run, demo
def advise(args) -> int:
    from .plan import advise as run_advise

    advice = run_advise(args.data, _settings(args, ExtractSettings), _settings(args, PlanSettings),
                        data_name=args.data)
    return _finish(args, advice.to_report(), advice.summary())


def _run_summary(outcome) -> str:
    result = outcome.result
    lines = [_sweep_summary(outcome.frozen)]
    if outcome.stage == "finetune":
        lines += ["", _finetune_summary(result)]
    elif outcome.stage == "ensemble":
        lines += ["", _finetune_summary(result.finetuned)]
    lines.append(f"chosen: {outcome.why}")
    test = result.best.get("test_accuracy") if outcome.stage == "sweep" else result.test_accuracy
    if test is not None:
        lines.append(f"case {outcome.advice.case}: test accuracy {test:.4f}")
    if outcome.out is not None:
        lines.append(f"outputs in {outcome.out}/ (plots, results, saved model for `tlp predict {outcome.out} IMAGES...`)")
    return "\n".join(lines)


def _run(args, data, test, options: dict) -> int:
    from ._run import run as run_all

    say = None if args.json else _print
    outcome = run_all(data, test=test, out=args.out, say=say, **options)
    return _finish(args, outcome.to_report(), _run_summary(outcome))


def run(args) -> int:
    from ._run import RUN_SETTINGS

    _one_process("run")
    return _run(args, args.data, parse_test(args.test), _values(args, RUN_SETTINGS))


def demo(args) -> int:
    if not args.json:
        _print("tlp demo: `tlp run digits --test 0.5 --no-hflip` with efficientnet_lite0, offline "
               "(1,797 8x8 digit images: is this data like ImageNet? which case? which layer and head?)")
    # Digits have a handedness (a mirrored 2 is no 2): flip-averaged features are not tried.
    return _run(args, "digits", 0.5, {**_values(args, (ModelOptions,)), "hflip": False, "progress": not args.quiet})


# ----------------------------------------------------------------------------- predict
def predict(args) -> int:
    from ._predict import predict as run_predict
    from ._predict import predict_imagenet

    if args.imagenet:
        predictions = predict_imagenet(args.inputs, model=args.model or DEFAULT_MODEL, weights=args.weights,
                                       top_k=args.top_k or 5, batch_size=args.batch_size, device=args.device,
                                       on_error=args.on_error)
    else:
        if len(args.inputs) < 2:
            raise TlpInputError("tlp predict needs MODEL_DIR and at least one image (or --imagenet IMAGES...)")
        if args.model or args.weights:
            raise TlpInputError("--model and --weights go with --imagenet; a saved model names its own")
        predictions = run_predict(args.inputs[0], args.inputs[1:], top_k=args.top_k or 1,
                                  batch_size=args.batch_size, device=args.device, on_error=args.on_error,
                                  trust_pickle=args.trust_pickle)
    text = predictions.to_csv(args.out)
    for skip in predictions.skipped:
        logger.warning("skipped %s: %s", skip["path"], skip["reason"])
    if args.json:
        _print(json.dumps({"predictions": predictions.rows, "skipped": predictions.skipped}, indent=2))
    else:
        sys.stdout.write(text)
    return 0


# ----------------------------------------------------------------------------- layers
def _node_info(by_node, node):
    if node in by_node:
        return by_node[node]
    inside = [info for name, info in by_node.items() if name.startswith(node + ".")]
    return inside[-1] if inside else None


def _is_block_output(node: str) -> bool:
    # Stage- or block-level modules ("layer3", "features.5", "blocks.4.1") rather than ops inside them.
    parts = node.split(".")
    return len(parts) <= 2 or (len(parts) == 3 and parts[-1].isdigit())


def layers(args) -> int:
    from .layers import list_nodes, preset_nodes
    from .models import resolve_model

    try:
        spec = resolve_model(args.model, weights=args.weights)
    except TlpInputError:
        if args.weights is not None:
            raise
        spec = resolve_model(args.model, weights="none")  # the graph does not need real weights
    nodes = list_nodes(spec, spec.build())
    by_node = {info.node: info for info in nodes}
    presets = preset_nodes(spec)
    rows = []
    for preset, node in presets.items():
        info = _node_info(by_node, node)
        rows.append([preset, node, info and "x".join(map(str, info.shape)), info and info.channels,
                     info and (info.stride or "-")])
    stage_ends = set(presets.values())
    shown = [info for info in nodes
             if args.all or info.node in stage_ends or info.stride is None or _is_block_output(info.node)]
    _print(f"presets of {spec.name} (shapes for a 128 px input):")
    _print(format_table(rows, ["preset", "node", "shape", "channels", "stride"]))
    _print()
    _print(f"graph nodes ({len(shown)} of {len(nodes)}; --all lists every node):")
    _print(format_table([[i.node, "x".join(map(str, i.shape)), i.channels, i.stride or "-"] for i in shown],
                        ["node", "shape", "channels", "stride"]))
    return 0


# ----------------------------------------------------------------------------- cache
def _cache(args):
    from .cache import CacheDir
    from .settings import resolve_cache_dir

    return CacheDir(resolve_cache_dir(args.cache_dir))


def cache_ls(args) -> int:
    from .featurefile import FeatureFile

    rows = []
    for path in _cache(args).finished_files():
        size = f"{path.stat().st_size / 1e6:.1f}"
        try:
            with FeatureFile(path) as features:
                rows.append(_ls_row(path, features, size))
        except TlpInputError:
            rows.append([path.stem[:12], "UNREADABLE", "", "", "", "", "", "", size, ""])
    _print(format_table(rows, ["key", "model", "weights", "size", "pooling", "data", "images", "layers", "MB",
                               "created"]))
    return 0


def _ls_row(path, features, size: str) -> list:
    """One cache entry as `tlp cache ls` shows it: what tells entries apart."""
    import os

    attrs = features.attrs
    poolings = {features.layer_meta(name).pooling for name in features.layers} - {"none"}
    root = attrs.get("data_root") or ""
    data = attrs.get("data_name", "")
    if root:
        relative = os.path.relpath(root)
        data = relative if not relative.startswith("..") else root
    return [path.stem[:12], attrs.get("model"), attrs.get("weights_id"), attrs.get("preprocessing", {}).get("crop_size"),
            ",".join(sorted(poolings)) or "-", data, features.n_rows(), ",".join(features.layers), size,
            attrs.get("created")]


def cache_info(args) -> int:
    from .featurefile import FeatureFile

    path = _cache(args).resolve(args.key)
    with FeatureFile(path) as features:
        info = {
            "path": str(path), "attributes": features.attrs, "n_images": features.n_rows(),
            "classes": features.classes, "n_skipped": len(features.skipped),
            "layers": {
                name: {**{k: v for k, v in dataclasses.asdict(features.layer_meta(name)).items() if k != "name"},
                       "dim": features.dim(name), "dtype": str(features.stored_dtype(name))}
                for name in features.layers
            },
        }
    _print(json.dumps(info, indent=2, default=str))
    return 0


def cache_verify(args) -> int:
    from .featurefile import FeatureFile

    cache = _cache(args)
    paths = [cache.resolve(args.key)] if args.key else cache.finished_files()
    bad = 0
    for path in paths:
        try:
            with FeatureFile(path) as features:
                problems = features.verify()
        except TlpInputError as error:
            problems = [str(error)]
        bad += bool(problems)
        _print(f"{path.stem[:12]}  {'ok' if not problems else 'BAD: ' + '; '.join(problems)}")
    checked = len(paths)
    if not args.key:  # committed shards of runs in progress or killed, which later runs absorb
        for shard, problems in cache.verify_shards():
            checked += 1
            bad += bool(problems)
            name = shard.relative_to(cache.root)
            _print(f"{name}  {'ok' if not problems else 'BAD: ' + '; '.join(problems)}")
    if bad:
        print(f"tlp: {bad} of {checked} entries failed verification; remove a finished file with `tlp cache rm KEY`; "
              "a bad shard is removed and its images extracted again by the next `tlp extract` that needs it",
              file=sys.stderr)
        return 1
    return 0


def cache_rm(args) -> int:
    path = _cache(args).resolve(args.key)
    path.unlink()
    _print(f"removed {path}")
    return 0


def cache_gc(args) -> int:
    removed = _cache(args).gc(partial=args.partial)
    for path, size in removed:
        _print(f"removed {path} ({size / 1e6:.1f} MB)")
    _print(f"freed {sum(size for _, size in removed) / 1e6:.1f} MB in {len(removed)} files")
    return 0
