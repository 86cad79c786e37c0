"""neox-train's flags, generated from the run config's fields, and the one mapping from parsed
flags to run-config overrides (neox-train, and neox-launch for the neox-train flags it passes on).

Each RunConfig field is the flag `--field-name`, typed by the field's annotation, its help the
field's doc and default; a bool is a switch away from its default (`--x` when false, `--no-x` when
true). What that rule cannot know (another name, metavar, choices, --help section) sits in the
field's metadata (config._f). Only the flags that set no field (--config, --resume, --takeover,
--describe) are written out here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any

from neox_train.config import RunConfig, load_run_config
from neox_train.errors import ConfigError

_GROUPS = {
    "performance": "performance (each switch is measured in docs/performance.md)",
    "self-healing": "self-healing (see docs/healing.md)",
}
_ARGPARSE_KEYS = ("metavar", "choices", "nargs", "const")


def flag_fields() -> list[dataclasses.Field]:
    """The RunConfig fields that are flags (all but those whose metadata says flag=None)."""
    return [f for f in dataclasses.fields(RunConfig) if f.metadata.get("flag", "") is not None]


def flag_name(f: dataclasses.Field) -> str:
    """The field's flag: `--field-name` unless its metadata names another (a default-true bool's
    switch is this with `no-` after the dashes)."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(f: dataclasses.Field) -> type:
    """bool, int, float or str: the field's annotation, without `| None`."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    args = tuple(a for a in args if a is not type(None))
    if len(args) != 1 or args[0] not in (bool, int, float, str):
        raise TypeError(f"RunConfig.{f.name}: {hint} is no flag type (bool, int, float, str, or "
                        f"one of them | None); declare it with flag=None")
    return args[0]


def _shown(value: Any) -> str:
    """A default as a run-config JSON file writes it (strings bare)."""
    return value if isinstance(value, str) else json.dumps(value)


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help (a doc says "~33% more compute")


def _add_field_flag(where: Any, f: dataclasses.Field) -> None:
    doc, flag, kind = f.metadata["doc"], flag_name(f), _value_type(f)
    if kind is not bool:
        extra = {k: f.metadata[k] for k in _ARGPARSE_KEYS if k in f.metadata}
        alone = f"; {flag} alone: {f.metadata['const']}" if "const" in f.metadata else ""
        typed = {} if kind is str else {"type": kind}  # argparse's own default: the string as given
        where.add_argument(flag, dest=f.name, **typed, **extra,
                           help=_help(f"{doc} (default: {_shown(f.default)}{alone})"))
        return
    negative = "--no-" + flag[2:]
    if f.metadata.get("both") or f.default is None:  # both directions, as in a config file
        pair = where.add_mutually_exclusive_group()
        pair.add_argument(flag, action="store_true", default=None, dest=f.name,
                          help=_help(f"{doc} (default: {_shown(f.default)})"))
        pair.add_argument(negative, action="store_true", dest="no_" + f.name,
                          help=f"the opposite of {flag}: {f.name} false")
    elif f.default:
        where.add_argument(negative, action="store_true", dest="no_" + f.name,
                           help=_help(f"{doc} (default: true; {negative} sets it false)"))
    else:
        where.add_argument(flag, action="store_true", dest=f.name,
                           help=_help(f"{doc} (default: false)"))


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neox-train",
        description="Train a GPT-NeoX model with the DeepSpeed engine. Run under `deepspeed` for "
                    "several processes. Every run-config field but `name` and `data` is a flag; a "
                    "default shown is the field's own, which the --config preset or file may "
                    "change, and a flag given overrides both.",
    )
    p.add_argument("--config", default="production",
                   help="run preset (test, production, demo) or a JSON file")
    groups = {key: p.add_argument_group(title) for key, title in _GROUPS.items()}
    for f in flag_fields():
        _add_field_flag(groups[f.metadata["group"]] if "group" in f.metadata else p, f)
        # The flags that set no field sit beside the field they go with (neox-launch passes
        # flags on in this order).
        if f.name == "save_dir":
            p.add_argument("--resume", metavar="latest|auto|TAG|URL",
                           help="continue from a checkpoint: latest or a tag in --save-dir, or the "
                                "newest COMPLETE one at a gs:// or file:// URL (latest also falls "
                                "back to --sync-to when --save-dir has none); auto: like latest, "
                                "but a start from step 0 when there is no checkpoint anywhere yet "
                                "(what the supervisor restarts with)")
        elif f.name == "sync_to":
            p.add_argument("--takeover", action="store_true",
                           help="publish to a --sync-to prefix that another run owns (that run "
                                "can no longer publish there; what it published stays as it is)")
    p.add_argument("--describe", action="store_true",
                   help="print the effective configuration as JSON and exit")
    # The deepspeed launcher appends --local_rank=N; the rank itself comes from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def run_config_from_args(ns: argparse.Namespace) -> RunConfig:
    """The run config neox-train will build from the same flags: flags not given do not override."""
    run = load_run_config(ns.config)
    if ns.data_dir and run.data:
        raise ConfigError(f"--data-dir {ns.data_dir}: the config {ns.config} trains on a mixture "
                          f"(`data`); give one or the other (edit `data` to change the mixture)")
    overrides: dict[str, Any] = {}
    for f in flag_fields():
        value = getattr(ns, f.name, None)
        if getattr(ns, "no_" + f.name, False):
            overrides[f.name] = False
        elif value is not None and value is not False:  # identity: 0 and 0.0 are values
            overrides[f.name] = value
    return run.replace(**overrides) if overrides else run
