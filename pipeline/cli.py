"""Command line: ``tlp VERB ...`` (also ``python -m tlp``). Parses, calls the API, prints.

Every verb's options are generated from the fields of the settings it hands to the
library (:mod:`tlp.settings`): a field is declared once, with its help, metavar and
option group, so ``tlp run`` accepts every option of the stages it calls and help
texts cannot drift between verbs. A name that several stages of one verb share
(``--batch-size`` in ``run``) is one option that goes to each; where their defaults
differ, each stage keeps its own unless the option is given.

Streams: results (tables, predictions, layer lists, ``cache ls``) go to stdout;
progress bars and log messages go to stderr. ``--json`` prints the report on stdout
instead of the table; ``-q`` hides progress and logs, never results; ``-v`` logs debug
messages and shows tracebacks. Exit codes: 0 ok, 2 bad usage or input (one line saying
what and how to fix it), 1 a failure of the environment or of tlp (one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from . import __version__, commands
from .errors import TlpInputError
from .faults import describe
from .settings import (ExtractSettings, FinetuneSettings, ModelOptions, PlanSettings, SweepSettings, comma_list,
                       positive_int)

__all__ = ["main", "build_parser", "VERBS"]

GROUPS = {
    "data": "data",
    "model": "model (shared by every stage that runs the network)",
    "extraction": "extraction (the frozen forward pass and the cache)",
    "heads": "heads (the sweep over cached layers)",
    "planner": "planner (size and similarity)",
    "fine-tuning": "fine-tuning",
    "output": "output",
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in every help line, except on-off flags (whose default is their absence)."""

    def _get_help_string(self, action):
        if action.nargs == 0:
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 2 on one line, with a suggestion for a misspelt verb or option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        choice = re.search(r"invalid choice: '?([^' ]*)'? \(choose from (.*)\)", message)
        if choice:
            options = [option.strip().strip("'") for option in choice.group(2).split(",")]
            close = difflib.get_close_matches(choice.group(1), options, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        raise TlpInputError(f"{self.prog}: {message}")


# ----------------------------------------------------------------------------- generated options
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_for(item: dataclasses.Field) -> Callable | None:
    parse = item.metadata.get("parse")
    if parse is not None:
        return parse
    if isinstance(item.default, tuple):
        return comma_list
    return None if item.default is None else type(item.default)


def _shown_default(value):
    """How a default reads in help and is parsed back: tuples as comma lists."""
    return ",".join(value) if isinstance(value, tuple) else value


def _merged_fields(classes, exclude) -> dict[str, list[tuple[type, dataclasses.Field]]]:
    """Field name -> (class, field) for every class of a verb that has it, in order."""
    merged: dict[str, list] = {}
    for cls in classes:
        for item in dataclasses.fields(cls):
            if item.metadata.get("cli", True) and item.name not in exclude:
                merged.setdefault(item.name, []).append((cls, item))
    return merged


def _add_field(groups, name: str, owners, override):
    """One option for a field that one or more stages of the verb have (see the module docstring)."""
    first = owners[0][1]
    meta = first.metadata
    helps = list(dict.fromkeys(item.metadata["help"] for _, item in owners))
    help_text = helps[0] if len(helps) == 1 else "; ".join(f"{cls.STAGE}: {item.metadata['help']}"
                                                             for cls, item in owners)
    defaults = [item.default for _, item in owners]
    kwargs = {"dest": name, "help": help_text}
    if isinstance(first.default, bool):
        kwargs["action"] = "store_false" if first.default else "store_true"
        flag = ("--no-" if first.default else "--") + name.replace("_", "-")
        kwargs["help"] = meta.get("flag_help") or help_text
    else:
        flag = _flag(name)
        kwargs.update(type=_parse_for(first), metavar=meta.get("metavar"), choices=meta.get("choices"),
                      default=_shown_default(first.default))
        if any(d != first.default for d in defaults):
            shown = "; ".join(f"{cls.STAGE}: {_shown_default(item.default)}" for cls, item in owners)
            kwargs.update(default=argparse.SUPPRESS, help=f"{help_text} (default: {shown})")
    if override is not None:
        kwargs.update(override)
    return groups[meta["group"]], flag, kwargs


def add_settings_options(parser: argparse.ArgumentParser, groups: dict, classes, *, defaults=None,
                         exclude=()) -> None:
    """Options for every command-line field of ``classes``, in their option groups.

    ``defaults`` maps a field name to keyword arguments that replace the generated ones
    for this verb (another default, or ``argparse.SUPPRESS`` with its own help). Two
    fields that name each other as alternatives (``excludes``) are mutually exclusive.
    """
    defaults = defaults or {}
    merged = _merged_fields(classes, exclude)
    pairs = {}
    for name, owners in merged.items():
        partner = owners[0][1].metadata.get("excludes")
        if partner in merged:
            pairs[name] = pairs[partner] = tuple(sorted((name, partner)))
    exclusive: dict[tuple, argparse._MutuallyExclusiveGroup] = {}
    for name, owners in merged.items():
        group, flag, kwargs = _add_field(groups, name, owners, defaults.get(name))
        if name in pairs:
            if pairs[name] not in exclusive:
                exclusive[pairs[name]] = group.add_mutually_exclusive_group()
            group = exclusive[pairs[name]]
        group.add_argument(flag, **kwargs)


# ----------------------------------------------------------------------------- verbs
@dataclass(frozen=True)
class Verb:
    """A command: the settings it hands to the library and the options only it has."""

    name: str
    help: str
    handler: Callable
    classes: tuple = ()  # settings classes whose fields become options
    data: bool = True  # takes DATA
    test: bool = False  # takes --test
    out: str | None = None  # help of --out DIR, if it takes one
    report: bool = True  # takes --report FILE and --json
    defaults: dict = field(default_factory=dict)  # field -> argparse keyword arguments for this verb
    exclude: tuple = ()  # fields of the classes this verb does not offer


_RUN_LAYERS = {"default": argparse.SUPPRESS,
               "help": "presets, graph node names or fusions such as mid+late (default: the measured similarity's: "
                       "mid,late,penultimate,mid+late when similar, early,mid,late,mid+late,early+mid+late when "
                       "different)"}
_RUN_TTA = {"default": argparse.SUPPRESS,
            "help": "none, flip or d4: use these features only (default: plain, then flip-averaged features for the "
                    "winning row, kept if their CV is higher, and where the data has no up and is too small to "
                    "fine-tune, d4; --no-hflip skips both)"}
_RUN_ROTATE = {"default": argparse.SUPPRESS, "action": argparse.BooleanOptionalAction,
               "help": "random quarter turns in fine-tuning (default: measured; on when quarter-turned images "
                       "are classified as well as upright ones, that is, when the data has no up)"}

VERBS = (
    Verb("extract", "cache pooled multi-depth features of a data set", commands.extract, (ExtractSettings,)),
    Verb("sweep", "sweep softmax/SVM/MLP/kNN heads over cached layers; save the winner", commands.sweep,
         (ExtractSettings, SweepSettings), test=True, defaults={"pool": {"default": "auto"}}, exclude=("shard",),
         out="folder for results.csv, accuracy_by_depth.png, confusion_matrix.png and the saved winner "
             "(head-<sha12>.skops, model.json) that `tlp predict` reads"),
    Verb("finetune", "fine-tune the network with a new classifier layer (large data, cases 3-4)", commands.finetune,
         (FinetuneSettings,), test=True,
         out="folder for model-<sha12>.pt, model.json, history.csv, history.png and checkpoints/ (a rerun resumes)"),
    Verb("advise", "measure size and similarity, print the case (1-4) and its recipe", commands.advise,
         (ExtractSettings, PlanSettings), exclude=("layers", "pool", "tta", "budget", "finetune_per_class", "shard")),
    Verb("run", "advise, then measure frozen heads, flip-averaged features, a second network and fine-tuning "
                "within --budget; keep the best on validation", commands.run,
         (ExtractSettings, SweepSettings, PlanSettings, FinetuneSettings), test=True,
         defaults={"pool": {"default": "auto"}, "layers": _RUN_LAYERS, "tta": _RUN_TTA, "rotate": _RUN_ROTATE},
         exclude=("shard",),
         out="folder for the plots, results and the winner's saved model (fine-tuning's own folder in finetune/)"),
    Verb("demo", "`tlp run digits --test 0.5 --no-hflip` offline with the default model", commands.demo,
         (ModelOptions,), data=False, out="folder for the plots, results and saved model"),
)


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and -q, before or after the verb (after it, they only set what is given)."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show tracebacks", **default)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log messages (results are "
                                                                   "still printed)", **default)


def _add_verb(verbs, verb: Verb) -> None:
    parser = verbs.add_parser(verb.name, help=verb.help, description=verb.help)
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    if verb.data:
        groups["data"].add_argument("data", metavar="DATA",
                                    help="a folder (one sub-folder per class), a CSV manifest (path,label), or a "
                                         "built-in name (digits, photos)")
    if verb.test:
        groups["data"].add_argument("--test", metavar="FRACTION|N|DATA", default=None,
                                    help="test part, never used for a choice: a fraction or a count of DATA "
                                         "(stratified, seeded) or a separate data set with the same class names")
    add_settings_options(parser, groups, verb.classes, defaults=verb.defaults, exclude=verb.exclude)
    if verb.out is not None:
        groups["output"].add_argument("--out", metavar="DIR", default="tlp-demo" if verb.name == "demo" else None,
                                      help=verb.out)
    if verb.report:
        groups["output"].add_argument("--report", metavar="FILE", default=None, help="write the JSON report to FILE")
        groups["output"].add_argument("--json", action="store_true", help="print the JSON report on stdout "
                                                                          "instead of the table")
    _common(groups["output"], top=False)
    parser.set_defaults(func=verb.handler, verb_settings=verb.classes)


def _help_of(cls, name: str) -> str:
    """The help text a settings field declares (for options declared by hand)."""
    return next(item.metadata["help"] for item in dataclasses.fields(cls) if item.name == name)


def _add_predict(verbs) -> None:
    parser = verbs.add_parser("predict", help="label images with a saved model (or the network's ImageNet labels)",
                              description="label images with a saved model (or the network's ImageNet labels)")
    parser.add_argument("inputs", nargs="+", metavar="MODEL_DIR IMAGES",
                        help="a folder written by `tlp sweep --out` or `tlp finetune --out`, then image files or "
                             "folders of them (with --imagenet: images only)")
    parser.add_argument("--imagenet", action="store_true", help="use the pretrained network's own ImageNet labels")
    parser.add_argument("--model", metavar="NAME", default=None,
                        help="model for --imagenet (None: efficientnet_lite0); a saved model names its own")
    parser.add_argument("--weights", metavar="FILE", default=None, help=f"weights for --imagenet: {_help_of(ModelOptions, 'weights')}")
    parser.add_argument("--top-k", type=positive_int, metavar="K", default=None,
                        help="labels per image, most probable first (None: 1; 5 with --imagenet)")
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the CSV to FILE")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON instead of CSV")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", default=32, help="images per forward pass")
    parser.add_argument("--device", metavar="DEVICE", default="auto", help=_help_of(ModelOptions, "device"))
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="bad image files: fail (exit 2, naming the file) or skip (leave them out)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="also load an old pickle head (head.joblib, tlp-head-v1), which can run code when "
                             "loaded: only for a folder you wrote yourself; `tlp sweep --out` again re-saves it "
                             "in the safe format")
    _common(parser, top=False)
    parser.set_defaults(func=commands.predict)


def _add_layers(verbs) -> None:
    parser = verbs.add_parser("layers", help="list a model's layer presets and graph nodes",
                              description="list a model's layer presets and graph nodes")
    parser.add_argument("model", metavar="MODEL", help="model name, e.g. efficientnet_lite0 or resnet50")
    parser.add_argument("--weights", metavar="FILE", default=None,
                        help="weights file (None: the model's own if present, else a random initialisation: "
                             "the graph is the same)")
    parser.add_argument("--all", action="store_true", help="list every node, not only stage and block outputs")
    _common(parser, top=False)
    parser.set_defaults(func=commands.layers)


def _add_cache(verbs) -> None:
    cache_help = _help_of(ModelOptions, "cache_dir")
    parser = verbs.add_parser("cache", help="list, check and clean the feature cache",
                              description="list, check and clean the feature cache")
    parser.add_argument("--cache-dir", metavar="DIR", default=None, help=cache_help)
    actions = parser.add_subparsers(dest="action", required=True, parser_class=_Parser, metavar="ACTION")
    specs = [
        ("ls", "list cache entries", commands.cache_ls, None),
        ("info", "show one entry's attributes and layers", commands.cache_info, ("key", {})),
        ("verify", "re-hash entries and check their structure (exit 1 if any is bad)", commands.cache_verify,
         ("key", {"nargs": "?", "default": None})),
        ("rm", "delete one entry", commands.cache_rm, ("key", {})),
        ("gc", "delete orphaned temporary files, unreadable entries and merged shards", commands.cache_gc, None),
    ]
    for name, help_text, handler, positional in specs:
        action = actions.add_parser(name, help=help_text, description=help_text)
        if positional is not None:
            action.add_argument(positional[0], metavar="KEY", help="key or unique prefix", **positional[1])
        if name == "gc":
            action.add_argument("--partial", action="store_true",
                                help="also delete unfinished work (shards of interrupted runs)")
        # Before or after the action: after it, only a given value replaces the one before.
        action.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS, help=cache_help)
        _common(action, top=False)
        action.set_defaults(func=handler)
    _add_verb(actions, Verb("assemble", "join the rows of a sharded extraction (tlp extract --shard) into the cache "
                                        "file, without forward passes; give the options the ranks ran with",
                            commands.cache_assemble, (ExtractSettings,), exclude=("shard",),
                            defaults={"cache_dir": {"default": argparse.SUPPRESS}}))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tlp", description="Transfer learning for image classification: extract once, sweep "
                                             "heads, fine-tune when data is large.")
    parser.add_argument("--version", action="version", version=f"tlp {__version__}")
    _common(parser, top=True)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser, metavar="VERB")
    for verb in VERBS[:2]:
        _add_verb(verbs, verb)
    _add_predict(verbs)
    _add_layers(verbs)
    _add_cache(verbs)
    for verb in VERBS[2:]:
        _add_verb(verbs, verb)
    parser.verb_parsers = dict(verbs.choices)  # for "did you mean" on a verb's options
    return parser


# ----------------------------------------------------------------------------- entry point
def _suggest(parser: argparse.ArgumentParser, args, unknown: list[str]) -> str:
    """'unrecognized arguments' with the closest option of the verb for each unknown flag."""
    verb_parser = parser.verb_parsers.get(getattr(args, "verb", None), parser)
    flags = list(verb_parser._option_string_actions)
    hints = []
    for word in unknown:
        close = difflib.get_close_matches(word.split("=")[0], flags, n=1) if word.startswith("-") else []
        if close:
            hints.append(f"did you mean {close[0]} for {word}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f"; {' '.join(hints)}" if hints else "")


class _Logging:
    """The CLI, not the library, decides what is logged: INFO by default, DEBUG with -v,
    nothing below ERROR with -q; to the stderr of the moment. Undone when the command
    ends, so a program (or test) calling ``main`` keeps its own logging."""

    def __init__(self, verbose: bool, quiet: bool):
        self.logger = logging.getLogger("tlp")
        self.level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO

    def __enter__(self):
        self.previous = self.logger.level
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.logger.addHandler(self.handler)
        self.logger.setLevel(self.level)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (tests call this directly)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = argparse.Namespace(verbose="-v" in argv or "--verbose" in argv)
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            raise TlpInputError(f"tlp {args.verb}: {_suggest(parser, args, unknown)}")
        with _Logging(args.verbose, args.quiet):
            return int(args.func(args) or 0)
    except SystemExit as done:  # --help, --version
        return int(done.code or 0)
    except TlpInputError as error:
        print(f"tlp: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlp: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one line for people (see tlp.faults); -v shows the traceback
        if args.verbose:
            raise
        code, message = describe(error, args)
        print(f"tlp: error: {message}", file=sys.stderr)
        return code


def main_entry() -> None:
    """Console-script entry point (``tlp``)."""
    sys.exit(main())
