"""The language-model loss without the whole logits: the output layer and the cross-entropy in one
autograd function, over chunks of tokens.

The plain path (`model(x).logits`, then `F.cross_entropy(logits.float(), y)`) holds the logits in
the model's dtype, their fp32 copy and the log-softmax saved for backward, each [tokens, vocab]: at
micro-batch 4 x seq 2048 x vocab 50304 that is 0.8 + 1.65 + 1.65 GB in forward, and as much again
for their gradients in backward. Here one chunk of `chunk` tokens is computed at a time, in forward
and again in backward (the recompute is one more output-layer matmul, ~2% of a 1.2B step's FLOPs),
and nothing of the size [tokens, vocab] is kept between them.

Numerics follow the plain path: the logits are the output layer's matmul in the model's dtype, the
softmax and the loss in fp32; the logits' gradient is cast to the model's dtype before the two
backward matmuls, as autograd does on the plain path. The weight's gradient is summed over chunks
in fp32 (the plain path sums in one matmul): tests/test_lm_loss.py states the tolerances.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPTNeoXForCausalLM
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

# Tokens per chunk: [chunk, vocab] fp32 is 206 MB at vocab 50304; big enough that the matmuls stay
# efficient, small next to a 1.2B step's activations.
DEFAULT_CHUNK = 1024
IGNORE = -100  # F.cross_entropy's ignore_index: targets that count for nothing


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        count = (targets != IGNORE).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ weight.t()).float()
            total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum",
                                     ignore_index=IGNORE)
        ctx.save_for_backward(hidden, weight, targets, count)
        ctx.chunk = chunk
        return total / count

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, count = ctx.saved_tensors
        scale = grad.float() / count
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            # d loss / d logits = softmax - onehot(target), zero for ignored targets
            p = (h @ weight.t()).float().softmax(-1)
            keep = t != IGNORE
            p[keep.nonzero(as_tuple=True)[0], t[keep]] -= 1.0
            p[~keep] = 0.0
            p = (p * scale).to(hidden.dtype)
            grad_hidden[start:start + ctx.chunk] = p @ weight
            grad_weight += (p.t() @ h).float()
        return grad_hidden, grad_weight.to(weight.dtype), None, None


def document_inputs(batch: torch.Tensor, eos: int, *, additive: torch.dtype | None = None,
                    block: bool = False) -> dict[str, torch.Tensor]:
    """Document masking for windows [B, T+1] of documents packed with `eos` after each: the inputs'
    position ids restarting at 0 after every EOS, the block-causal attention mask [B, 1, T, T] (a
    token sees the earlier tokens of its own document only; True = attend, or with `additive` a
    float mask of that dtype, 0 / min, as eager attention adds it), and the targets with the one
    after each EOS (the next document's first token, which nothing in its own document predicts)
    set to IGNORE. `block`: the mask as FlexAttention's BlockMask instead (attention
    flex_attention, CUDA: block-causal without a [T, T] tensor, fully masked blocks skipped)."""
    inputs, targets = batch[:, :-1], batch[:, 1:].clone()
    is_eos = inputs == eos
    length = inputs.shape[1]
    index = torch.arange(length, device=batch.device).expand_as(inputs)
    # the document of each position: how many EOS come before it
    document = is_eos.long().cumsum(1) - is_eos.long()
    # where the position's document starts: one past the last EOS before it (0 for the first)
    after_eos = torch.where(is_eos, index + 1, torch.zeros_like(index))
    start = torch.cat([torch.zeros_like(index[:, :1]), after_eos[:, :-1]], 1).cummax(1).values
    if block:
        # deferred: FlexAttention (and its compile) only for attention=flex_attention
        from torch.nn.attention.flex_attention import create_block_mask

        def same_document_causal(b, h, q, kv):
            return (document[b, q] == document[b, kv]) & (q >= kv)

        mask = create_block_mask(same_document_causal, inputs.shape[0], None, length, length,
                                 device=batch.device)
    else:
        mask = ((document[:, :, None] == document[:, None, :])
                & (index[:, :, None] >= index[:, None, :]))[:, None]
    if additive is not None and not block:
        mask = torch.zeros(mask.shape, dtype=additive, device=batch.device).masked_fill_(
            ~mask, torch.finfo(additive).min)
    targets[is_eos] = IGNORE
    return {"input_ids": inputs, "position_ids": index - start, "attention_mask": mask,
            "targets": targets}


def documents(plan, model) -> dict:
    """window_loss's document-masking arguments for a run (`plan`: train.plan.RunPlan): the EOS id,
    and for eager attention the float mask's dtype (the model's); {} when it is off."""
    if not plan.run.document_masking:
        return {}
    attention = plan.model_config._attn_implementation
    return {"eos": plan.model_config.eos_token_id,
            "additive": next(model.parameters()).dtype if attention == "eager" else None,
            "block": attention == "flex_attention"}


def window_loss(model, batch: torch.Tensor, *, chunk: int, eos: int | None = None,
                additive: torch.dtype | None = None, block: bool = False) -> torch.Tensor:
    """The mean next-token loss of token windows [B, T+1] through `model` (a NeoxForCausalLM, or
    the DeepSpeed engine around one): chunked (LMHead), or with chunk 0 the whole logits, then the
    cross-entropy in fp32 (a bf16 log-softmax over 50k classes loses the small differences that
    make the loss). `eos`: document masking (document_inputs; `additive` for eager attention)."""
    if eos is None:
        inputs = {"input_ids": batch[:, :-1], "targets": batch[:, 1:]}
    else:
        inputs = document_inputs(batch, eos, additive=additive, block=block)
    if chunk:
        return model(**inputs)
    targets = inputs.pop("targets")
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """mean cross-entropy of (hidden @ weight.T) against targets over the targets that are not
    IGNORE; hidden [..., H], targets [...]."""
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                     targets.reshape(-1), chunk)


class LMHead(nn.Linear):
    """The output layer (GPTNeoX's lm_head, saved as embed_out) that can also return the loss:
    `head(hidden)` gives the logits as nn.Linear does; `head(hidden, targets)` the mean
    cross-entropy, computed by linear_cross_entropy. A module call either way, so ZeRO-3 gathers
    the weight for it (in backward too) as for any layer."""

    chunk = DEFAULT_CHUNK

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        return linear_cross_entropy(hidden, self.weight, targets, chunk=self.chunk)


class NeoxForCausalLM(GPTNeoXForCausalLM):
    """transformers' GPTNeoXForCausalLM, the same parameters and outputs, plus `model(input_ids=x,
    targets=y)`: the mean loss through LMHead, never the whole logits. neox-train trains this class;
    checkpoints and exports are GPTNeoX's (its parameter names, its config)."""

    def __init__(self, config):
        super().__init__(config)
        # The same module and weight, initialised by transformers as always; only its class gains
        # the targets path (no parameter is created or replaced, which matters under ZeRO-3's
        # zero.Init).
        self.lm_head.__class__ = LMHead

    def forward(self, input_ids=None, targets=None, **kwargs):
        if targets is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.gpt_neox(input_ids=input_ids, **kwargs).last_hidden_state
        return self.lm_head(hidden, targets)


# transformers renames GPTNeoX's saved head (embed_out) to lm_head when it loads a folder, by the
# class's name: the same renaming for this class, or from_pretrained would leave the head random.
register_checkpoint_conversion_mapping(
    NeoxForCausalLM.__name__, get_checkpoint_conversion_mapping(GPTNeoXForCausalLM.__name__),
    overwrite=True)
