"""neox-train's flags come from the run config's fields: every field is a flag (but `name` and
`data`) whose --help quotes its doc and default, and every flag of the hand-written parser they
replaced still parses to what it set before."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from neox_train.cli.launch import main as launch_main
from neox_train.config import RunConfig, field_docs, load_run_config
from neox_train.errors import ConfigError
from neox_train.flags import flag_fields, flag_name, run_config_from_args, train_parser
from neox_train.launch.launcher import forwarded_train_args

# The option strings of the hand-written parser (before the flags came from the fields): users'
# scripts and docs use them, so each must stay.
OLD_OPTIONS = {
    "-h", "--help", "--config", "--ds-config", "--data-dir", "--save-dir", "--log-dir",
    "--max-steps", "--micro-batch", "--grad-accum", "--mixed-precision", "--seq-len",
    "--save-steps", "--log-steps", "--eval-steps", "--seed", "--resume", "--allow-data-change",
    "--sync-to", "--takeover", "--credentials", "--init-from-hf", "--activation-checkpointing",
    "--optimizer-impl", "--compile", "--attention", "--vocab-pad-multiple", "--prefetch",
    "--peak-tflops", "--async-save", "--no-async-save", "--preemption-grace-s", "--hang-timeout-s",
    "--no-loss-guard", "--loss-spike-factor", "--max-bad-steps", "--no-background-upload",
    "--describe", "--local_rank", "--local-rank",
}

# (argv, field, value it sets): each value differs from the production preset's (the default
# --config), so a flag that sets nothing, or the wrong field, fails.
OLD_FLAGS = [
    (["--ds-config", "zero3"], "ds_config", "zero3"),
    (["--data-dir", "/d"], "data_dir", "/d"),
    (["--save-dir", "/s"], "save_dir", "/s"),
    (["--log-dir", "/l"], "log_dir", "/l"),
    (["--max-steps", "7"], "max_steps", 7),
    (["--max-steps=7"], "max_steps", 7),
    (["--micro-batch", "2"], "micro_batch", 2),
    (["--grad-accum", "8"], "grad_accum", 8),
    (["--mixed-precision", "fp16"], "mixed_precision", "fp16"),
    (["--seq-len", "512"], "seq_len", 512),
    (["--save-steps", "50"], "save_steps", 50),
    (["--log-steps", "5"], "log_steps", 5),
    (["--eval-steps", "0"], "eval_steps", 0),  # 0 is a value, not "unset"
    (["--seed", "7"], "seed", 7),
    (["--allow-data-change"], "allow_data_change", True),
    (["--sync-to", "gs://b/p"], "sync_to", "gs://b/p"),
    (["--credentials", "/k.json"], "credentials", "/k.json"),
    (["--init-from-hf", "/hf"], "init_from_hf", "/hf"),
    (["--activation-checkpointing"], "activation_checkpointing", True),
    (["--optimizer-impl", "deepspeed_fused"], "optimizer_impl", "deepspeed_fused"),
    (["--compile"], "compile", "inductor"),
    (["--compile", "eager"], "compile", "eager"),
    (["--attention", "eager"], "attention", "eager"),
    (["--vocab-pad-multiple", "1"], "vocab_pad_multiple", 1),
    (["--prefetch", "0"], "prefetch_micro_batches", 0),
    (["--peak-tflops", "0.5"], "peak_tflops", 0.5),
    (["--no-async-save"], "async_save", False),
    (["--preemption-grace-s", "10"], "preemption_grace_s", 10.0),
    (["--hang-timeout-s", "60.5"], "hang_timeout_s", 60.5),
    (["--no-loss-guard"], "loss_guard", False),
    (["--loss-spike-factor", "0"], "loss_spike_factor", 0.0),
    (["--max-bad-steps", "0"], "max_bad_steps", 0),
    (["--no-background-upload"], "background_upload", False),
]

# The fields that had no flag before.
NEW_FLAGS = [
    (["--model", "neox-160m"], "model", "neox-160m"),
    (["--vocab-size", "50257"], "vocab_size", 50257),
    (["--warmup-steps", "10"], "warmup_steps", 10),
    (["--eval-batches", "4"], "eval_batches", 4),
    (["--keep-last-n", "0"], "keep_last_n", 0),
    (["--val-fraction", "0.1"], "val_fraction", 0.1),
    (["--max-shards", "2"], "max_shards", 2),
    (["--upload-timeout-s", "60"], "upload_timeout_s", 60.0),
    (["--max-unpublished-checkpoints", "0"], "max_unpublished_checkpoints", 0),
    (["--unreachable-warning-s", "5"], "unreachable_warning_s", 5.0),
    (["--loss-spike-window", "10"], "loss_spike_window", 10),
    (["--max-rollbacks", "0"], "max_rollbacks", 0),
    (["--max-pending-uploads", "2"], "max_pending_uploads", 2),
    (["--transfer-streams", "4"], "transfer_streams", 4),
    (["--no-parallel-uploads"], "parallel_uploads", False),
    (["--profile-steps", "3-4"], "profile_steps", "3-4"),
    (["--memory-snapshot", "5"], "memory_snapshot", 5),
    (["--report-to", "wandb,mlflow"], "report_to", "wandb,mlflow"),
    (["--tracker-project", "pythia"], "tracker_project", "pythia"),
    (["--loss-chunk", "0"], "loss_chunk", 0),
    (["--document-masking"], "document_masking", True),
    (["--lr-schedule", "wsd"], "lr_schedule", "wsd"),
    (["--decay-steps", "2"], "decay_steps", 2),
]


def parse(argv: list[str]) -> RunConfig:
    return run_config_from_args(train_parser().parse_args(argv))


def option_strings() -> set[str]:
    return {o for action in train_parser()._actions for o in action.option_strings}


def squeezed(text: str) -> str:
    """Without whitespace: argparse re-wraps help, breaking lines at spaces and after hyphens."""
    return "".join(text.split())


def test_every_old_option_string_remains():
    assert OLD_OPTIONS <= option_strings(), sorted(OLD_OPTIONS - option_strings())


@pytest.mark.parametrize(("argv", "name", "value"), OLD_FLAGS + NEW_FLAGS,
                         ids=[" ".join(argv) for argv, _, _ in OLD_FLAGS + NEW_FLAGS])
def test_flag_sets_its_field(argv, name, value):
    production = load_run_config("production")
    assert getattr(production, name) != value  # else the test could not tell
    run = parse(argv)
    assert getattr(run, name) == value and type(getattr(run, name)) is type(value)
    others = {k: v for k, v in run.to_dict().items() if k != name}
    assert others == {k: v for k, v in production.to_dict().items() if k != name}


def test_tables_cover_every_flag_field():
    covered = {name for _, name, _ in OLD_FLAGS + NEW_FLAGS}
    assert covered == {f.name for f in flag_fields()}


def test_only_name_and_data_are_no_flags():
    """`name` comes from --config and `data` is a list of objects; every other field is a flag."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert fields - {f.name for f in flag_fields()} == {"name", "data"}


def test_all_flags_at_once_round_trip():
    argv = [a for flags, _, _ in OLD_FLAGS + NEW_FLAGS if flags != ["--compile"] for a in flags]
    run = parse(argv + ["--config", "demo"])
    expected = {name: value for flags, name, value in OLD_FLAGS + NEW_FLAGS
                if flags != ["--compile"]}
    assert {k: getattr(run, k) for k in expected} == expected
    assert run.name == "demo"


def test_flags_not_given_do_not_override():
    # demo differs from the fields' defaults (and production) in many fields: none may be reset
    assert parse(["--config", "demo"]) == load_run_config("demo")
    assert parse([]) == load_run_config("production")


def test_help_quotes_each_fields_doc_and_default():
    text = squeezed(train_parser().format_help())
    for f in flag_fields():
        default = f.default if isinstance(f.default, str) else json.dumps(f.default)
        assert squeezed(f"{f.metadata['doc']} (default: {default}") in text, f.name
    assert set(field_docs()) >= {f.name for f in flag_fields()}


def test_help_keeps_its_sections():
    text = train_parser().format_help()
    perf = text.split("performance (")[1].split("self-healing (")[0]
    heal = text.split("self-healing (")[1]
    assert all(f in perf for f in ("--optimizer-impl", "--compile", "--attention", "--prefetch N"))
    assert all(f in heal for f in ("--hang-timeout-s S", "--no-loss-guard", "--max-bad-steps M"))
    assert "--local" not in text  # the launcher's --local_rank stays hidden


def test_default_true_bool_is_a_no_switch():
    run = parse([])
    for f in flag_fields():
        if typing.get_type_hints(RunConfig)[f.name] is not bool or not f.default:
            continue
        negative = "--no-" + flag_name(f)[2:]
        assert negative in option_strings(), f.name
        assert getattr(parse([negative]), f.name) is False and getattr(run, f.name) is True
        if not f.metadata.get("both"):
            assert flag_name(f) not in option_strings()  # it would only repeat the default


def test_async_save_both_ways_from_a_file_that_sets_the_other(tmp_path):
    for stored, flag, want in ((False, "--async-save", True), (True, "--no-async-save", False)):
        path = tmp_path / f"run_{stored}.json"
        path.write_text(json.dumps({"base": "demo", "async_save": stored}))
        assert parse(["--config", str(path)]).async_save is stored
        assert parse(["--config", str(path), flag]).async_save is want


def test_switch_pair_is_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        train_parser().parse_args(["--async-save", "--no-async-save"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--max-steps", "many"],
                                  ["--mixed-precision", "fp8"], ["--loss-guard"]])
def test_bad_flags_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train_parser().parse_args(argv)
    assert e.value.code == 2 and "neox-train: error:" in capsys.readouterr().err


def test_flags_that_set_no_field():
    ns = train_parser().parse_args(["--resume", "latest", "--takeover", "--describe",
                                    "--local_rank=3"])
    assert (ns.resume, ns.takeover, ns.describe, ns.local_rank) == ("latest", True, True, 3)
    assert train_parser().parse_args(["--local-rank", "1"]).local_rank == 1
    assert parse(["--config", "test"]).name == "test"


def test_data_dir_with_a_mixture_is_refused(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"base": "demo", "data": [{"path": "a", "weight": 1}]}))
    with pytest.raises(ConfigError, match="trains on a mixture"):
        parse(["--config", str(path), "--data-dir", "/d"])


@pytest.mark.parametrize("argv", [["--async-save"], ["--no-async-save"], ["--no-loss-guard"],
                                  ["--compile", "--prefetch", "0", "--eval-steps", "0"],
                                  ["--resume", "auto", "--takeover", "--max-rollbacks", "0"]])
def test_neox_launch_passes_flags_on_unchanged(argv):
    """neox-launch rebuilds neox-train's command line from the parsed flags."""
    parser = train_parser()
    ns = parser.parse_args(argv)
    again = parser.parse_args(forwarded_train_args(parser, ns))  # exit 2 on a contradiction
    assert run_config_from_args(again) == run_config_from_args(ns)
    assert (again.resume, again.takeover) == (ns.resume, ns.takeover)


def test_neox_launch_help_lists_every_field_flag(capsys):
    assert launch_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(flag_name(f) in out or "--no-" + flag_name(f)[2:] in out for f in flag_fields())


def test_readme_names_only_real_flags():
    """The README's command-line table lists neox-train flags by hand: each must exist."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `neox-train`")]
    named = {flag for row in rows for flag in re.findall(r"--[a-z][a-z0-9-]*", row)}
    named.discard("--field-name")  # the rule, not a flag
    assert len(named) > 20 and named <= option_strings(), sorted(named - option_strings())
