"""The chunked loss (neox_train/lm_loss.py) against the whole-logits path: the same loss and the
same gradients, in fp32 (tight) and bf16 (the rounding of the plain path's own bf16 matmuls), for
chunks that divide the tokens, that do not, and that exceed them; ignored targets; the logits path
unchanged; and a real ZeRO-3 run on two ranks logging the same losses either way."""

from __future__ import annotations

import json

import pytest
import torch

from neox_train.lm_loss import IGNORE, NeoxForCausalLM, linear_cross_entropy, window_loss
from neox_train.model import hf_config

from conftest import VOCAB, read_metrics, run_train, test_ds_config, tiny_run_config

# fp32: summation order only (the weight's gradient is summed over chunks). bf16: both paths round
# the logits' gradient to bf16 before the backward matmuls; the chunked one sums the weight's
# gradient in fp32, the plain one in a single bf16 matmul.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-3)}


def _model(dtype=torch.float32) -> NeoxForCausalLM:
    torch.manual_seed(0)
    return NeoxForCausalLM(hf_config("neox-tiny", VOCAB)).to(dtype)


def _grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss = window_loss(model, batch, chunk=chunk)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_whole_logits(dtype, chunk):
    model = _model(dtype)
    batch = torch.randint(0, VOCAB, (3, 33), generator=torch.Generator().manual_seed(1))
    loss, grads = _grads(model, batch, 0)
    chunked, chunked_grads = _grads(model, batch, chunk)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, loss.float(), **TOLERANCE[dtype])
    assert chunked_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **TOLERANCE[dtype], msg=name)


def test_ignored_targets_count_for_nothing():
    torch.manual_seed(2)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    targets = torch.randint(0, 16, (10,))
    targets[[0, 4, 9]] = IGNORE
    loss = linear_cross_entropy(hidden, weight, targets, chunk=3)
    loss.backward()
    ref_h = hidden.detach().clone().requires_grad_()
    ref_w = weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_h @ ref_w.t(), targets, ignore_index=IGNORE)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, ref_h.grad)
    torch.testing.assert_close(weight.grad, ref_w.grad)
    assert hidden.grad[[0, 4, 9]].abs().max() == 0


def test_the_logits_path_is_gptneoxs_own():
    from transformers import GPTNeoXForCausalLM

    model = _model()
    plain = GPTNeoXForCausalLM(model.config)
    plain.load_state_dict(model.state_dict())
    assert model.state_dict().keys() == plain.state_dict().keys()  # checkpoints and exports
    ids = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits,
                               rtol=0, atol=0)


def test_a_gptneox_folder_loads_whole(tmp_path):
    """transformers renames the saved head (embed_out) for GPTNeoX by class name: ours too."""
    from transformers import GPTNeoXForCausalLM

    saved = GPTNeoXForCausalLM(_model().config)
    saved.save_pretrained(tmp_path)
    loaded, info = NeoxForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.slow
def test_zero3_on_two_ranks_logs_the_same_losses_chunked_or_not(token_dir, tmp_path):
    """ZeRO-3 gathers the output layer's weight for the chunked loss's forward and backward (a
    module call, as any layer); the losses logged equal the whole-logits run's."""
    losses = {}
    for chunk in (0, 5):
        folder = tmp_path / f"chunk{chunk}"
        folder.mkdir()
        run = tiny_run_config(folder, token_dir, ds_config=str(test_ds_config(folder, 3)),
                              max_steps=4, save_steps=4, eval_steps=2, loss_chunk=chunk)
        run_train(["--config", str(run)], nprocs=2)
        train = read_metrics(folder / "logs")
        evals = read_metrics(folder / "logs", "eval")
        losses[chunk] = ([train[s]["loss"] for s in sorted(train)],
                         [evals[s]["loss"] for s in sorted(evals)])
        assert json.loads((folder / "run.json").read_text())["loss_chunk"] == chunk
    assert len(losses[0][0]) == 4 and len(losses[0][1]) == 2
    assert losses[5][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[5][1] == pytest.approx(losses[0][1], rel=1e-5)
