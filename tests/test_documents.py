"""Document masking: a packed window's logits, loss and gradients equal those of each of its
documents run alone (fp32), at several boundary positions, a document ending on the window's edge
among them; for the training attention (SDPA under its mask-free name, neox_sdpa) and eager; with
the chunked loss and the whole logits. Then a real run: masked training resumes exactly. (Exports
are unchanged: the masking has no parameters, and the model's are GPTNeoX's own:
test_lm_loss.py.)"""

from __future__ import annotations

import pytest
import torch

from neox_train.lm_loss import IGNORE, NeoxForCausalLM, document_inputs, window_loss
from neox_train.model import hf_config, use_training_attention

from conftest import copy_checkpoint, read_metrics, run_train, test_ds_config, tiny_run_config

VOCAB, EOS = 64, 0
# fp32, the same kernels on a shorter input: summation order only
TOL = dict(rtol=1e-5, atol=2e-6)


def _model(attention: str) -> NeoxForCausalLM:
    torch.manual_seed(0)
    model = NeoxForCausalLM(hf_config("neox-tiny", VOCAB, eos_token_id=EOS, attention=attention))
    use_training_attention(model)  # as training runs it: sdpa under the name neox_sdpa
    return model


def _documents(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    """Documents of these lengths, each ending with EOS (its last token), no EOS inside."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randint(1, VOCAB, (n - 1,), generator=g), torch.tensor([EOS])])
            for n in lengths]


# windows of T+1 = 16 tokens: (the documents' lengths, where the window cuts the last one)
CASES = {
    "middle": [5, 7, 9],  # the third document runs past the window
    "edge": [5, 10, 9],  # the second ends (EOS) as the window's last input token
    "last-target": [6, 10],  # the second's EOS is the window's last target
    "one-token": [1, 4, 1, 12],  # documents of EOS alone
    "no-boundary": [20],
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_packed_window_equals_its_documents_run_alone(case, attention):
    model = _model(attention)
    docs = _documents(CASES[case])
    window = torch.cat(docs)[:16][None]
    additive = torch.float32 if attention == "eager" else None
    inputs = document_inputs(window, EOS, additive=additive)
    packed = model(**{k: v for k, v in inputs.items() if k != "targets"}).logits[0]

    # each document alone: its tokens inside the window (inputs: all but the window's last token)
    start, expected_logits, total, count = 0, [], torch.zeros(()), 0
    for doc in docs:
        part = doc[: max(0, min(len(doc), 15 - start))]
        if len(part):
            alone = model(input_ids=part[None]).logits[0]
            expected_logits.append(alone)
            targets = window[0, start + 1:start + 1 + len(part)].clone()
            targets[part == EOS] = IGNORE  # the next document's first token: not scored
            total = total + torch.nn.functional.cross_entropy(
                alone, targets, ignore_index=IGNORE, reduction="sum")
            count += int((targets != IGNORE).sum())
        start += len(doc)
        if start >= 15:
            break
    torch.testing.assert_close(packed, torch.cat(expected_logits), **TOL)
    assert inputs["position_ids"][0].tolist() == [
        i for d in docs for i in range(len(d))][:15]

    reference = total / count
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    for chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        loss = window_loss(model, window, chunk=chunk, eos=EOS, additive=additive)
        loss.backward()
        torch.testing.assert_close(loss, reference, **TOL)
        for name, grad in want.items():
            torch.testing.assert_close(model.get_parameter(name).grad, grad, **TOL, msg=name)


def test_without_masking_the_window_attends_across_documents():
    """The check above can fail: unmasked, the second document sees the first."""
    model = _model("sdpa")
    docs = _documents([5, 10])
    window = torch.cat(docs)[None]
    plain = model(input_ids=window[:, :-1]).logits[0, 5:]
    alone = model(input_ids=docs[1][None, :-1]).logits[0]
    assert (plain - alone).abs().max() > 1e-3


@pytest.mark.slow
def test_masked_training_resumes_exactly(prepared_dir, tmp_path):
    """The prepared data's EOS separates its documents; 6 steps straight against 3 + a resume."""
    run = tiny_run_config(tmp_path, prepared_dir, ds_config=str(test_ds_config(tmp_path, 1)),
                          vocab_size=None, max_steps=6, save_steps=3, eval_steps=3,
                          document_masking=True)
    run_train(["--config", str(run)])
    straight = read_metrics(tmp_path / "logs")
    resumed_dir = tmp_path / "resumed"
    copy_checkpoint(tmp_path / "ckpt", resumed_dir, "global_step3")
    run_train(["--config", str(run), "--save-dir", str(resumed_dir), "--log-dir",
               str(tmp_path / "logs2"), "--resume", "latest"])
    resumed = read_metrics(tmp_path / "logs2")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-6)
    assert (read_metrics(tmp_path / "logs2", "eval")[6]["loss"]
            == pytest.approx(read_metrics(tmp_path / "logs", "eval")[6]["loss"], abs=1e-6))


def test_flex_attention_and_masking_without_eos_are_refused_at_start(token_dir, prepared_dir):
    from neox_train.config import from_dict
    from neox_train.errors import ConfigError
    from neox_train.train.plan import prepare_run

    with pytest.raises(ConfigError, match="attention=flex_attention needs CUDA"):
        prepare_run(from_dict({"attention": "flex_attention", "data_dir": str(prepared_dir),
                               "vocab_size": None}), dp_size=1, on_gpu=False)
    # synthetic shards with no meta.json: no EOS id to tell the documents apart
    with pytest.raises(ConfigError, match="document_masking needs the EOS id"):
        prepare_run(from_dict({"document_masking": True, "data_dir": str(token_dir),
                               "vocab_size": 256}), dp_size=1, on_gpu=False)
