"""Model presets: the flagship's parameter count (built on the meta device) and the FLOPs
formula."""

import json

import pytest
import torch

from neox_train.model import (
    MODEL_PRESETS,
    build_model,
    count_parameters,
    flops_per_token,
    hf_config,
    padded_vocab_size,
    parameter_counts,
)


def test_vocab_padding():
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50304) == 50304
    assert padded_vocab_size(1) == 128


def test_neox_1_2b_parameter_count_matches_pythia_1_4b():
    cfg = hf_config("neox-1.2b", padded_vocab_size(50257))
    counts = parameter_counts(cfg)
    assert counts.total == 1_414_647_808
    assert counts.non_embedding == 1_208_602_624


def test_flagship_shape():
    cfg = hf_config("neox-1.2b", 50304)
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size)
    assert shape == (2048, 24, 16, 8192)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.use_parallel_residual and not cfg.tie_word_embeddings
    assert cfg.max_position_embeddings == 2048


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_preset_builds_on_meta(name):
    counts = parameter_counts(hf_config(name, 50304))
    assert 0 < counts.non_embedding < counts.total


def test_tiny_model_uses_sdpa_and_runs():
    model = build_model(hf_config("neox-tiny", 256))
    assert model.config._attn_implementation == "sdpa"
    out = model(torch.randint(0, 256, (2, 16))).logits
    assert out.shape == (2, 16, 256)
    counts = count_parameters(model)
    assert counts.total - counts.non_embedding == 2 * 256 * 64


def test_flops_per_token_is_megatron_formula():
    cfg = hf_config("neox-1.2b", 50304)
    L, h, s, v = 24, 2048, 2048, 50304
    megatron = 72 * L * h * h * (1 + s / (6 * h) + v / (12 * L * h))
    assert flops_per_token(cfg, s) == pytest.approx(megatron, rel=1e-12)
    # Megatron's count with recompute: the layers' forward runs again, the logits layer does not.
    recompute = 96 * L * h * h * (1 + s / (6 * h) + v / (16 * L * h))
    assert (flops_per_token(cfg, s, activation_checkpointing=True)
            == pytest.approx(recompute, rel=1e-12))
    # 6N is the usual shorthand; the exact count exceeds it by the attention-score term.
    n = parameter_counts(cfg).non_embedding
    assert 6 * n < flops_per_token(cfg, s) < 8 * n


def test_weight_decay_groups_use_real_shapes_under_zero3():
    from neox_train.model import param_groups

    model = build_model(hf_config("neox-tiny", 256))
    groups = param_groups(model, 0.1)
    assert (all(p.ndim >= 2 for p in groups[0]["params"])
            and all(p.ndim == 1 for p in groups[1]["params"]))
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    # ZeRO-3 placeholders are empty 1-D tensors carrying the real shape in ds_shape.
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([64, 64])
    holder = torch.nn.Module()
    holder.w = placeholder
    assert param_groups(holder, 0.1)[0]["params"] == [placeholder]


def test_attention_switch_and_sdpa_takes_the_flash_eligible_call(monkeypatch):
    """FlashAttention in torch's SDPA needs is_causal=True and no explicit mask (a materialised
    causal mask sends SDPA to the slower memory-efficient or math kernel). The real call is
    observed, not replaced."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def observe(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", observe)
    torch.manual_seed(0)
    sdpa = build_model(hf_config("neox-tiny", 256))
    ids = torch.randint(0, 256, (2, 16))
    out_sdpa = sdpa(ids).logits
    assert calls == [(None, True)] * 2  # one call per layer, flash-eligible
    eager = build_model(hf_config("neox-tiny", 256, attention="eager"))
    eager.load_state_dict(sdpa.state_dict())
    calls.clear()
    out_eager = eager(ids).logits
    assert calls == [] and eager.config._attn_implementation == "eager"
    torch.testing.assert_close(out_eager, out_sdpa, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
def test_training_attention_calls_sdpa_causal_without_a_mask_even_compiled(monkeypatch, compiled):
    """Under torch.compile transformers' own "sdpa" name materialises a (batch, 1, seq, seq) mask,
    which costs the flash kernel; the name training uses must reach SDPA with is_causal=True and no
    mask both ways, and compute the same logits as the plain model."""
    import torch.nn.functional as F

    from neox_train.model import TRAINING_SDPA, use_training_attention

    calls = []
    real = F.scaled_dot_product_attention

    def observe(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return real(*args, **kwargs)

    torch.manual_seed(0)
    model = build_model(hf_config("neox-tiny", 256)).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
    use_training_attention(model)
    assert model.config._attn_implementation == TRAINING_SDPA
    # saved configs and exports stay plain HF
    assert "neox_sdpa" not in json.dumps(model.config.to_dict())
    monkeypatch.setattr(F, "scaled_dot_product_attention", observe)
    if compiled:
        torch._dynamo.reset()
        forward = torch.compile(model, backend="eager")
    else:
        forward = model
    with torch.no_grad():
        got = forward(ids).logits
    assert calls == [(True, True)] * 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    eager = build_model(hf_config("neox-tiny", 256, attention="eager"))
    use_training_attention(eager)  # leaves other implementations alone
    assert eager.config._attn_implementation == "eager"
