"""`neox-convert-hf`: real checkpoints from real training runs (ZeRO 0-3 x 1 and 2 processes through
the real launcher, bf16 and fp32) converted and loaded back with transformers, compared with
references that do not go through our code (DeepSpeed's public zero_to_fp32 API, the module weights
DeepSpeed saved); the tokenizer path on data prepared by `neox-data prepare`; the round trip HF ->
`neox-train --init-from-hf` -> convert; conversion from a bucket on the GCS emulator; and every bad
input, each one line.

Conversions run in-process through `main()` (the console script's function) to spare the import
time; the CLI and tools/ wrapper are run as real processes where the exit status and the exact
stderr line are the point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neox_train.checkpoint.local import commit
from neox_train.cli import convert
from neox_train.convert import to_hf

from conftest import (
    BIN,
    REPO,
    TRAINED_CASES,
    TRAINED_SAVE_AT,
    TRAINED_STEPS,
    VOCAB,
    built_once,
    read_metrics,
    run_train,
    test_ds_config,
    tiny_run_config,
    train_env,
)
from gcs import direct_client, gcs_bucket, gcs_emulator  # noqa: F401

pytestmark = pytest.mark.slow  # each training case starts real processes; kept in the default run

STEPS = TRAINED_STEPS  # the final tag of every run converted here
# (ZeRO stage, processes, training precision): the session's shared runs (conftest.trained_run,
# which test_train checks): every stage at 1 and 2 ranks, bf16 and fp32 both at every rank count.
CASES = TRAINED_CASES
# also trained on `neox-data prepare` output, so that run records a tokenizer
TOKENIZER_CASE = (1, 1, "bf16")
_runs: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def trained(trained_run, tmp_path_factory, prepared_dir):
    """get(stage, nprocs, precision) -> a run folder: the shared run, or with prepared=True one
    trained here on the prepared data (tokenizer included) with the same steps and saves."""

    def get(stage: int, nprocs: int, precision: str, *, prepared: bool = False) -> Path:
        key = (stage, nprocs, precision, prepared)
        if key not in _runs:
            if not prepared:
                _runs[key] = trained_run(stage, nprocs, precision)
            else:
                def train(tmp: Path) -> None:
                    run = tiny_run_config(
                        tmp, prepared_dir, ds_config=str(test_ds_config(tmp, stage)),
                        mixed_precision=precision, max_steps=STEPS, save_steps=TRAINED_SAVE_AT,
                        eval_steps=TRAINED_SAVE_AT, vocab_size=None,
                    )
                    run_train(["--config", str(run)], nprocs=nprocs)

                _runs[key] = built_once(tmp_path_factory,
                                        f"prepared_zero{stage}_{nprocs}p_{precision}", train)
        return _runs[key]

    return get


def run_convert(capfd, *args: str) -> tuple[int, dict | None, str]:
    """main(ARGS) in-process: (exit status, the --json object or None, stderr)."""
    code = convert.main([*map(str, args)])
    out, err = capfd.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 and "--json" in args
                  else None), err


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("neox-convert-hf: ")]
    return lines[-1]


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export, read with safetensors itself (names as on disk)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference_state(tag_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    """The checkpoint's weights without our code: DeepSpeed's public zero_to_fp32 API (non-lazy) for
    ZeRO 1-3, the module DeepSpeed saved for ZeRO-0 (in the training precision)."""
    if stage == 0:
        return torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def reference_model(tag_dir: Path, state: dict[str, torch.Tensor]):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(
        GPTNeoXConfig.from_dict(json.loads((tag_dir / "config.json").read_text())))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def tokens(vocab: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(7))


# -- every ZeRO stage x 1 and 2 processes ----------------------------------------------------------


@pytest.mark.parametrize("stage,nprocs,precision", CASES,
                         ids=[f"zero{s}-{n}proc-{p}" for s, n, p in CASES])
def test_convert_loads_in_transformers_with_equal_logits(trained, tmp_path, capfd, stage, nprocs,
                                                         precision):
    from transformers import AutoModelForCausalLM

    run_dir = trained(stage, nprocs, precision)
    tag_dir = run_dir / "ckpt" / f"global_step{STEPS}"
    out = tmp_path / "hf"
    code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", out, "--dtype", "fp32",
                                     "--verify", "--json")
    assert code == 0, err
    assert (summary["zero_stage"], summary["dp_size"], summary["step"]) == (stage, nprocs, STEPS)
    # fp32 masters exist from ZeRO-1 on, and at ZeRO-0 when DeepSpeed's bf16 optimizer keeps them.
    assert summary["fp32_masters"] == (stage > 0 or precision == "bf16")
    assert summary["verify"]["max_abs_diff"] <= summary["verify"]["tolerance"]
    assert "verify: max abs logit diff" in err

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32 and type(model).__name__ == "GPTNeoXForCausalLM"
    ref_state = reference_state(tag_dir, stage)
    exported = model.state_dict()
    assert sorted(exported) == sorted(ref_state)
    for name, want in ref_state.items():
        if want.dtype == torch.float32:
            assert torch.equal(exported[name], want), name
        # ZeRO-0 bf16: the export holds the fp32 masters, which round to exactly the module's
        # weights
        else:
            assert torch.equal(exported[name].to(want.dtype), want), name
    if stage == 0 and precision == "bf16":
        assert any(not torch.equal(exported[n], w.float()) for n, w in ref_state.items()), \
            "masters not used"

    ids = tokens(VOCAB)
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref = reference_model(tag_dir, ref_state)(input_ids=ids).logits
    if stage == 0 and precision == "bf16":
        assert (got - ref).abs().max() < 0.05  # the reference holds the bf16-rounded weights
    else:
        assert torch.equal(got, ref)
    generated = model.generate(ids[:1, :8], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 13)

    # Model card: step, tokens seen and final loss of this very run.
    card = (out / "README.md").read_text()
    train = read_metrics(run_dir / "logs")
    assert f"| training step | {STEPS} |" in card
    assert f"| tokens seen | {STEPS * 4 * 2 * nprocs * 32:,} |" in card
    assert f"| final training loss | {train[STEPS]['loss']:.4f} (step {STEPS}) |" in card
    assert ("| validation loss | " in card
            and "not recorded" not in card.split("| validation loss |")[1].split("\n")[0])
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"] == ["GPTNeoXForCausalLM"] and config["dtype"] == "float32"
            and config["use_cache"])
    assert (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".hf.*")), "staging folder left behind"


def test_bf16_and_fp16_exports_verify_within_tolerance(trained, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    run_dir = trained(2, 2, "bf16")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        out = tmp_path / dtype
        code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", out, "--dtype", dtype,
                                         "--verify", "--json")
        assert code == 0, err
        diff = summary["verify"]["max_abs_diff"]
        # > 0: it really ran in low precision
        assert 0 < diff <= summary["verify"]["tolerance"], summary["verify"]
        model = AutoModelForCausalLM.from_pretrained(out)
        assert model.dtype == torch_dtype
        assert (json.loads((out / "config.json").read_text())["dtype"]
                == {"bf16": "bfloat16", "fp16": "float16"}[dtype])
    # Without --dtype the export keeps the training precision.
    code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "default",
                                     "--json")
    assert code == 0 and summary["dtype"] == "bf16", err


def test_verify_fails_and_installs_nothing_when_logits_disagree(
    trained, tmp_path, capfd, monkeypatch):
    run_dir = trained(2, 2, "bf16")
    # bf16 logits never equal the fp32 model's exactly
    monkeypatch.setitem(to_hf.TOLERANCE, "bf16", 0.0)
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "hf", "--dtype", "bf16",
                               "--verify")
    assert code == 1
    assert error_line(err).startswith("neox-convert-hf: verify failed: max abs logit diff ")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_sharded_output_has_an_index_and_loads_identically(trained, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    run_dir = trained(3, 2, "no")
    code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "sharded",
                                     "--max-shard-size", "100KB", "--json")
    assert code == 0, err
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == summary["total_size"] == summary["parameters"] * 4
    assert all((tmp_path / "sharded" / s).stat().st_size <= 100_000 + 20_000 for s in shards)
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "single")
    assert code == 0, err
    assert not (tmp_path / "single" / "model.safetensors.index.json").exists()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "single").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    # transformers' own on-disk names (the head is stored as embed_out, as save_pretrained writes
    # it).
    assert "embed_out.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]


# -- tokenizer and vocabulary padding --------------------------------------------------------------


def test_tokenizer_is_exported_and_unpadding_keeps_it_consistent(
        trained, prepared_dir, tmp_path, capfd):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = trained(*TOKENIZER_CASE, prepared=True)
    tag_dir = run_dir / "ckpt" / f"global_step{STEPS}"
    padded = json.loads((tag_dir / "config.json").read_text())["vocab_size"]
    assert padded == 384  # 300 tokens, padded to a multiple of 128 for training

    code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "padded",
                                     "--json")
    assert code == 0, err
    # Training copies the data folder's tokenizer into every tag: the export takes that copy (the
    # same file).
    assert (summary["tokenizer"] == str(tag_dir / "tokenizer.json")
            and summary["vocab_size"] == padded)
    assert ((tag_dir / "tokenizer.json").read_bytes()
            == (prepared_dir / "tokenizer.json").read_bytes())
    code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "unpadded",
                                     "--unpad-vocab", "--verify", "--json")
    assert code == 0, err
    assert ((summary["vocab_size"], summary["padded_vocab_size"], summary["dtype"])
            == (300, 384, "bf16"))

    tok = AutoTokenizer.from_pretrained(tmp_path / "unpadded")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "unpadded").eval()
    padded_model = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    assert len(tok) == model.config.vocab_size == 300
    assert (model.get_input_embeddings().weight.shape[0]
            == model.get_output_embeddings().weight.shape[0] == 300)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == model.config.eos_token_id == 0
    assert model.generation_config.pad_token_id == 0
    text = "def main():\n    return [x for x in range(3)]"
    ids = tok(text, return_tensors="pt").input_ids
    # The same ids the training data was encoded with (prepare.py: no special tokens added).
    assert ids[0].tolist() == Tokenizer.from_file(str(prepared_dir / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits,
                           padded_model(input_ids=ids).logits[..., :300])
        assert torch.equal(model.get_input_embeddings().weight,
                           padded_model.get_input_embeddings().weight[:300])
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert isinstance(tok.decode(out[0]), str) and out.shape[1] == ids.shape[1] + 6
    card = (tmp_path / "unpadded" / "README.md").read_text()
    assert "embedding padding to 384 removed" in card and "| tokenizer | included |" in card


def test_no_tokenizer_is_said_and_tokenizer_flag_adds_one(trained, prepared_dir, tmp_path, capfd):
    run_dir = trained(0, 1, "no")  # trained on raw shards: no tokenizer anywhere
    code, summary, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "none", "--json")
    assert code == 0 and summary["tokenizer"] is None, err
    assert "no tokenizer recorded with this run" in err
    assert not (tmp_path / "none" / "tokenizer.json").exists()
    # A tokenizer larger than the model's vocabulary (300 > 256) is refused when named explicitly.
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "bad", "--tokenizer",
                               prepared_dir / "tokenizer.json")
    assert code == 2 and "has 300 tokens but the model's vocabulary is 256" in error_line(err)


# -- round trip ------------------------------------------------------------------------------------


def test_round_trip_hf_init_from_hf_convert_gives_identical_weights(
        trained, token_dir, tmp_path, capfd):
    """export (ZeRO-0) -> neox-train --init-from-hf (ZeRO-3, whose partitioned load is the harder
    path; lr 0: AdamW moves nothing) -> export again."""
    run_dir = trained(0, 1, "no")
    first = tmp_path / "first"
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", first, "--dtype", "fp32")
    assert code == 0, err
    run = tiny_run_config(tmp_path, token_dir, ds_config=str(test_ds_config(tmp_path, 3, lr=0.0)),
                          max_steps=1, save_steps=1, eval_steps=0)
    proc = run_train(["--config", str(run), "--init-from-hf", str(first)])
    assert "initialised the model from the HuggingFace folder" in proc.stderr
    second = tmp_path / "second"
    code, summary, err = run_convert(capfd, tmp_path / "ckpt", "--out", second, "--dtype", "fp32",
                                     "--json")
    assert code == 0 and summary["zero_stage"] == 3, err
    a, b = hf_weights(first), hf_weights(second)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- from a bucket ---------------------------------------------------------------------------------


def test_convert_from_the_emulated_bucket(trained, tmp_path, capfd, gcs_emulator, gcs_bucket):  # noqa: F811
    from neox_train.checkpoint.publish.backlog import publish_checkpoints
    from neox_train.remote import open_backend

    run_dir = trained(2, 2, "bf16")
    url = f"gs://{gcs_bucket}/run"
    # the real publisher: files, manifest, COMPLETE, latest
    publish_checkpoints(run_dir / "ckpt", open_backend(url))
    code, summary, err = run_convert(capfd, url, "--out", tmp_path / "from-gcs", "--dtype", "fp32",
                                     "--verify", "--json")
    assert code == 0, err
    assert summary["source"] == url and summary["tag"] == f"global_step{STEPS}"
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", tmp_path / "local", "--dtype",
                               "fp32")
    assert code == 0, err
    a, b = hf_weights(tmp_path / "from-gcs"), hf_weights(tmp_path / "local")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".neox-convert-fetch-*")), "download scratch left behind"

    # A damaged object: the manifest check refuses before anything is converted.
    bucket = direct_client(gcs_emulator.url).bucket(gcs_bucket)
    name = f"run/global_step{STEPS}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bucket.blob(name).download_as_bytes()
    bucket.blob(name).upload_from_string(data[: len(data) // 2])
    code, _, err = run_convert(capfd, url, "--out", tmp_path / "damaged")
    assert code == 2 and "damaged" in error_line(err) and "manifest" in error_line(err)
    # No COMPLETE marker: the tag does not count, the newest complete one is converted instead...
    bucket.blob(f"run/global_step{STEPS}/COMPLETE").delete()
    code, summary, err = run_convert(capfd, url, "--out", tmp_path / "older", "--json")
    assert code == 0 and summary["tag"] == f"global_step{TRAINED_SAVE_AT}", err
    # ...and with none left there is nothing to convert.
    bucket.blob(f"run/global_step{TRAINED_SAVE_AT}/COMPLETE").delete()
    code, _, err = run_convert(capfd, url, "--out", tmp_path / "incomplete")
    assert code == 2 and error_line(err) == (f"neox-convert-hf: error: {url}: no COMPLETE "
                                             "checkpoint there (a published checkpoint counts once "
                                             "its COMPLETE marker exists)")
    code, _, err = run_convert(capfd, url, "--out", tmp_path / "incomplete", "--tag",
                               f"global_step{STEPS}")
    assert code == 2 and "is not a COMPLETE published checkpoint" in error_line(err)
    assert not list(tmp_path.glob(".neox-convert-fetch-*")) and not (tmp_path / "damaged").exists()


def test_published_folder_is_read_like_a_bucket(trained, tmp_path, capfd):
    """A local folder in the published layout (the demo's ./bucket/demo) or its file:// URL: only
    COMPLETE tags, every file checked against the manifest; a plain save dir converts in place."""
    from neox_train.checkpoint.publish.backlog import publish_checkpoints
    from neox_train.remote import open_backend

    run_dir = trained(0, 2, "bf16")
    published = tmp_path / "bucket" / "run"
    publish_checkpoints(run_dir / "ckpt", open_backend(str(published)))
    assert (published / f"global_step{STEPS}" / "manifest.json").is_file()
    code, summary, err = run_convert(capfd, published, "--out", tmp_path / "a", "--json")
    assert (code == 0 and summary["source"] == str(published)
            and "verified against its manifest" in err), err
    code, summary, err = run_convert(capfd, f"file://{published}", "--out", tmp_path / "b",
                                     "--json")
    assert code == 0, err
    a, b = hf_weights(tmp_path / "a"), hf_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A file that no longer matches the manifest is refused; the same tag without COMPLETE does not
    # count.
    _truncate(published / f"global_step{STEPS}" / "mp_rank_00_model_states.pt")
    code, _, err = run_convert(capfd, published, "--out", tmp_path / "c")
    assert code == 2 and "manifest says size" in error_line(err), err
    (published / f"global_step{STEPS}" / "COMPLETE").unlink()
    code, _, err = run_convert(capfd, published, "--out", tmp_path / "c")
    assert code == 2 and "is not a COMPLETE published checkpoint" in error_line(err), err
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".neox-convert-fetch-*"))


# -- bad input: one line each, exit 2, nothing written ---------------------------------------------


def _copy_save_dir(run_dir: Path, dst: Path, *, marked: bool = False) -> Path:
    """A copy of a run's checkpoints. Unless `marked`, as a neox-train from before completeness
    markers wrote them (no marker, no run id): the conversion's own checks of a damaged checkpoint
    are what those cases test, and an old checkpoint meets them with nothing checked before."""
    shutil.copytree(run_dir / "ckpt", dst)
    if not marked:
        for marker in dst.glob(f"*/{commit.MARKER}"):
            marker.unlink()
        for run_json in dst.glob("*/run.json"):
            meta = json.loads(run_json.read_text())
            meta.pop("run_id", None)
            run_json.write_text(json.dumps(meta))
    return dst


def _drop_model_config(save_dir: Path) -> None:
    tag = save_dir / f"global_step{STEPS}"
    (tag / "config.json").unlink()
    states = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    del states["model_config"]
    torch.save(states, tag / "mp_rank_00_model_states.pt")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_master(save_dir: Path) -> None:
    """A valid file whose fp32 masters no longer match the module (a silent bit-rot case torch.load
    cannot see)."""
    path = _tag(save_dir) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states = torch.load(path, map_location="cpu", weights_only=False)
    with torch.no_grad():
        states["optimizer_state_dict"]["single_partition_of_fp32_groups"][0][3] += 0.5
    torch.save(states, path)


def _tag(save_dir: Path) -> Path:
    return save_dir / f"global_step{STEPS}"


def _not_a_checkpoint(d: Path) -> Path:
    (d / "x").mkdir()
    (d / "x" / "notes.txt").write_text("hi")
    return d / "x"


def _no_model_config(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(0, 1, "no", False)], d / "c")
    _drop_model_config(save_dir)
    return save_dir


def _truncated_model_states(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(0, 1, "no", False)], d / "c")
    _truncate(_tag(save_dir) / "mp_rank_00_model_states.pt")
    return save_dir


def _truncated_optim_shard(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(1, 2, "no", False)], d / "c")
    _truncate(_tag(save_dir) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return save_dir


def _missing_rank(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(1, 2, "no", False)], d / "c")
    (_tag(save_dir) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return save_dir


def _master_mismatch(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(1, 2, "no", False)], d / "c")
    _corrupt_master(save_dir)
    return save_dir


def _marked_and_truncated(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(1, 2, "no", False)], d / "c", marked=True)
    _truncate(_tag(save_dir) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    return save_dir


def _marked_and_flipped(d: Path) -> Path:
    save_dir = _copy_save_dir(_runs[(1, 2, "no", False)], d / "c", marked=True)
    _corrupt_master(save_dir)  # a valid file, other bytes: only the crc32c tells
    return save_dir


# case: (make the input in a tmp folder -> CHECKPOINT, extra args, expected text of the one line)
BAD = {
    "marked-truncated": (_marked_and_truncated, ("--tag", f"global_step{STEPS}"),
                         f"global_step{STEPS} is damaged or incomplete: "
                         f"zero_pp_rank_1_mp_rank_00_optim_states.pt has "),
    "marked-changed": (_marked_and_flipped, ("--tag", f"global_step{STEPS}"),
                       f"global_step{STEPS} is damaged or incomplete: "
                       "zero_pp_rank_1_mp_rank_00_optim_states.pt has "),
    "not-a-checkpoint": (_not_a_checkpoint, (),
                         "is not a DeepSpeed checkpoint folder: no 'latest' file"),
    "missing-path": (lambda d: d / "nowhere", (), "does not exist"),
    "missing-tag": (lambda d: _copy_save_dir(_runs[(1, 2, "no", False)], d / "c"),
                    ("--tag", "global_step99"),
                    f"checkpoint tag 'global_step99' not found in {{src}} (available: "
                    f"global_step{TRAINED_SAVE_AT}, global_step{STEPS})"),
    "no-model-config": (_no_model_config, ("--tag", f"global_step{STEPS}"),
                        "holds no model config (no config.json, and no 'model_config'"),
    "truncated-model-states": (_truncated_model_states, (),
                               "mp_rank_00_model_states.pt cannot be read, it is truncated or "
                               "corrupt"),
    "truncated-optim-shard": (_truncated_optim_shard, (),
                              "zero_to_fp32 cannot read this ZeRO-1 checkpoint, a file is "
                              "truncated"),
    "missing-rank": (_missing_rank, (),
                     "is a ZeRO-1 checkpoint of 2 ranks but lacks "
                     "(bf16_)zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "master-mismatch": (_master_mismatch, (), "do not match the module's float32 weights"),
    "bad-shard-size": (lambda d: _runs[(1, 2, "no", False)] / "ckpt", ("--max-shard-size", "lots"),
                       "--max-shard-size 'lots' is not a size"),
}


def test_a_torn_newest_tag_converts_the_newest_complete_one(trained, tmp_path, capfd):
    save_dir = _copy_save_dir(trained(0, 1, "no"), tmp_path / "c", marked=True)
    _truncate(_tag(save_dir) / "mp_rank_00_model_states.pt")  # a save that never finished writing
    code, out, err = run_convert(capfd, save_dir, "--out", tmp_path / "hf", "--json")
    assert code == 0, err
    assert out["tag"] == f"global_step{TRAINED_SAVE_AT}"
    assert f"names global_step{STEPS}: mp_rank_00_model_states.pt has" in err


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_isone_line(trained, tmp_path, capfd, case):
    trained(1, 2, "no"), trained(0, 1, "no")
    make, extra, message = BAD[case]
    src = make(tmp_path)
    out = tmp_path / "out"
    code, _, err = run_convert(capfd, src, "--out", out, *extra)
    assert code == 2, err
    line = error_line(err)
    assert line.startswith("neox-convert-hf: error: ") and message.format(src=src) in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_is_refused_unless_overwrite(trained, tmp_path, capfd):
    run_dir = trained(1, 2, "no")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", out)
    assert code == 2 and error_line(err) == (
        f"neox-convert-hf: error: --out {out} already exists; pass --overwrite to replace it, or "
        "choose another folder")
    assert (out / "stale.txt").exists()
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    # --overwrite never aims at the checkpoint itself.
    tag_dir = run_dir / "ckpt" / f"global_step{STEPS}"
    code, _, err = run_convert(capfd, run_dir / "ckpt", "--out", tag_dir, "--overwrite")
    assert code == 2 and "would replace the checkpoint" in error_line(err)
    assert (tag_dir / "mp_rank_00_model_states.pt").is_file()


def test_command_line_entry_points(trained, tmp_path):
    """The installed console script and tools/convert_to_hf.py: one stderr line and exit 2 on bad
    input; a summary JSON object alone on stdout (DeepSpeed's own prints go to stderr) on
    success."""
    run_dir = trained(3, 1, "bf16")
    for cmd in ([str(BIN / "neox-convert-hf")],
                [sys.executable, str(REPO / "tools" / "convert_to_hf.py")]):
        bad = subprocess.run([*cmd, str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, env=train_env(), timeout=120)
        assert bad.returncode == 2 and bad.stdout == ""
        last = bad.stderr.strip().splitlines()[-1]
        assert last.startswith(f"neox-convert-hf: error: {tmp_path / 'nowhere'} does not exist"), \
            last
    good = subprocess.run([str(BIN / "neox-convert-hf"), str(_tag(run_dir / "ckpt")), "--out",
                           str(tmp_path / "hf"),
                           "--json"], capture_output=True, text=True, env=train_env(), timeout=300)
    assert good.returncode == 0, good.stderr
    summary = json.loads(good.stdout)  # the whole of stdout is the one object
    assert ((summary["zero_stage"], summary["dtype"], summary["weight_files"])
            == (3, "bf16", ["model.safetensors"]))


@pytest.mark.parametrize("stage,precision", [(1, "no"), (2, "bf16"), (3, "no")])
def test_lazy_fp32_masters_equal_deepspeeds_eager_zero_to_fp32(trained, stage, precision):
    """convert.masters is the one place that reaches into zero_to_fp32's module (a deferred
    torch.cat for ZeRO-1/2, where DeepSpeed has no lazy mode of its own): what it hands out must be
    DeepSpeed's own result, bit for bit."""
    from deepspeed.utils import zero_to_fp32

    from neox_train.convert.masters import lazy_fp32_masters

    nprocs = 2
    tag_dir = _tag(trained(stage, nprocs, precision) / "ckpt")
    eager = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
        str(tag_dir.parent), tag=tag_dir.name)
    lazy, per_rank = lazy_fp32_masters(tag_dir, stage)
    assert sorted(lazy) == sorted(eager) and len(per_rank) == nprocs
    for name, tensor in eager.items():
        got = lazy[name].contiguous()
        assert got.dtype == torch.float32 and torch.equal(got, tensor), name
