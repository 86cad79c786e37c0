"""The model: named GPT-NeoX shapes -> transformers `GPTNeoXConfig`, construction (fresh, or from a
HuggingFace folder for `--init-from-hf`), weight-decay parameter groups, parameter counts, FLOPs per
token.

The model itself is transformers' `GPTNeoXForCausalLM` (SDPA attention); nothing here re-implements
it. Checkpoints therefore hold plain HF parameter names, which keeps conversion to HF a copy, not a
mapping. An HF folder's shape is checked against the run's model (config.json only) before any
process group or engine exists; its weights are loaded by transformers itself (`from_pretrained`,
which partitions under ZeRO-3 while an HfDeepSpeedConfig is alive). torch and transformers are
imported inside the functions that need them: the run config and `--describe` read presets from here
without paying for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neox_train.errors import ConfigError, read_json_object

# torch and transformers load only when a model is built: `neox-data` and config checks stay fast
if TYPE_CHECKING:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

GPT2_VOCAB_SIZE = 50257
# Padding the embedding to a multiple of 128 keeps the logits matmul on tensor-core friendly shapes;
# 50257 -> 50304 is what Pythia ships.
VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class ModelPreset:
    """The architecture of one named model. Vocabulary size is not part of it: it comes from the
    data."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_seq_len: int
    rotary_pct: float = 0.25
    parallel_residual: bool = True


MODEL_PRESETS: dict[str, ModelPreset] = {
    # The flagship: the Pythia-1.4B shape (1.2B parameters without the two embedding matrices).
    "neox-1.2b": ModelPreset(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=8192,
                             max_seq_len=2048),
    # The Pythia-410M shape: about 5 GB of checkpoint with Adam state (the checkpoint benchmarks).
    "neox-410m": ModelPreset(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                             max_seq_len=2048),
    # The Pythia-160M shape, for quick GPU experiments.
    "neox-160m": ModelPreset(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                             max_seq_len=2048),
    # Small enough to learn something on 2 CPU cores in a few minutes (the README demo).
    "neox-demo": ModelPreset(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                             max_seq_len=512),
    # For tests: a forward+backward in milliseconds.
    "neox-tiny": ModelPreset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
                             max_seq_len=256),
}


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Round the tokenizer's vocabulary up to `multiple` (50257 -> 50304)."""
    return -(-vocab_size // multiple) * multiple


# "sdpa" is torch's scaled_dot_product_attention, which takes the FlashAttention kernel on CUDA for
# bf16/fp16 when called with is_causal=True and no mask; "eager" is transformers' plain
# matmul-softmax-matmul, kept to measure what SDPA buys.
# flex_attention: transformers' FlexAttention path, CUDA only (its backward has no CPU kernel); with
# document masking it gets a BlockMask, block-causal without a dense mask (lm_loss.document_inputs)
ATTENTION_IMPLS = ("sdpa", "eager", "flex_attention")

# Training runs transformers' own SDPA attention function under a name of ours. For the name "sdpa",
# transformers builds the causal mask itself and checks position_ids for packed sequences first: in
# eager mode that check reads a GPU tensor into a Python bool (a host-device sync in every forward),
# and under torch.compile it cannot be evaluated, so a full (batch, 1, seq, seq) mask is
# materialised and SDPA loses the flash kernel. Our position_ids are always 0..seq-1 (windows of
# concatenated documents attend causally across document boundaries, as in GPT-NeoX), so that check
# can only find one sequence and the plain causal mask is all there is: a name without a registered
# mask function makes transformers skip both, and the attention function then calls SDPA with
# is_causal=True and no mask. Saved configs do not record the implementation, so exports are
# unaffected.
TRAINING_SDPA = "neox_sdpa"


def use_training_attention(model: GPTNeoXForCausalLM) -> None:
    """Switch a model built with attention "sdpa" to the mask-free training name (see
    TRAINING_SDPA)."""
    if model.config._attn_implementation != "sdpa":
        return
    # deferred: see the module docstring (here and below)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # register() is transformers' public way in, and idempotent (it sets one key of the global
    # mapping).
    AttentionInterface.register(TRAINING_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(TRAINING_SDPA)


def hf_config(
    preset_name: str, vocab_size: int, *, eos_token_id: int | None = None, attention: str = "sdpa"
) -> GPTNeoXConfig:
    """The transformers config for a preset; `vocab_size` is the (already padded) embedding size."""
    from transformers import GPTNeoXConfig  # deferred: see the module docstring

    p = MODEL_PRESETS[preset_name]
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": p.rotary_pct},
        use_parallel_residual=p.parallel_residual,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cache=False,  # training never reuses a KV cache; keeping it would hold memory
        bos_token_id=eos_token_id if eos_token_id is not None else 0,
        eos_token_id=eos_token_id if eos_token_id is not None else 0,
        attn_implementation=attention,
    )


def build_model(config: GPTNeoXConfig, *,
                device: str | torch.device | None = None) -> GPTNeoXForCausalLM:
    """Instantiate the model (on `device`; "meta" gives a shape-only model for counting): GPTNeoX
    with the lean loss path (lm_loss.NeoxForCausalLM)."""
    import torch  # deferred: see the module docstring

    from neox_train.lm_loss import NeoxForCausalLM

    if device is None:
        return NeoxForCausalLM(config)
    with torch.device(device):
        return NeoxForCausalLM(config)


@dataclass(frozen=True)
class ParamCounts:
    total: int
    non_embedding: int


def count_parameters(model: torch.nn.Module) -> ParamCounts:
    """Total and non-embedding counts; non-embedding excludes the input embedding and the (untied)
    output head, the convention of the Pythia and Chinchilla papers."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings()
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        embedding += out.weight.numel()
    return ParamCounts(total=total, non_embedding=total - embedding)


def parameter_counts(config: GPTNeoXConfig) -> ParamCounts:
    """Count parameters without allocating them (meta device), so the 1.2B model costs nothing to
    describe."""
    return count_parameters(build_model(config, device="meta"))


def flops_per_token(config: GPTNeoXConfig, seq_len: int, *,
                    activation_checkpointing: bool = False) -> int:
    """Training FLOPs per token with the Megatron-LM accounting (Narayanan et al. 2021, appendix).

    Forward per layer per token: 2*4h^2 for the QKV and output projections, 2*2*h*f for the MLP and
    2*2*s*h for the attention scores and the weighted sum (counted over the full s x s matrix, as
    Megatron does); the logits add 2*h*V. Backward costs twice the forward, so training is 3x
    forward: with f = 4h this is Megatron's 72*l*h^2*(1 + s/(6h) + V/(12*l*h)) (9.07 GFLOP for
    neox-1.2b at s=2048).

    With activation checkpointing each transformer layer's forward runs again in backward (the
    embedding and the logits are not recomputed), Megatron's 96*l*h^2*(1 + s/(6h) + V/(16*l*h)): the
    hardware FLOPs that HFU uses, not the model FLOPs that MFU uses.
    """
    h = config.hidden_size
    f = config.intermediate_size
    layers = config.num_hidden_layers * (8 * h * h + 4 * h * f + 4 * seq_len * h)
    logits = 2 * h * config.vocab_size
    return 3 * (layers + logits) + (layers if activation_checkpointing else 0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and LayerNorm weights (1-D tensors), the GPT-NeoX/Megatron
    convention.

    Under ZeRO-3 every parameter is an empty 1-D placeholder; its real shape is `ds_shape`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# The fields that decide the parameter shapes and the computation; anything else (dtype, ids,
# bookkeeping) may differ between an export and a training preset.
SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
    "rotary_pct", "rotary_emb_base", "use_parallel_residual", "tie_word_embeddings", "hidden_act",
    "layer_norm_eps",
)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _rotary(cfg: dict[str, Any], key: str) -> Any:
    # transformers 5 keeps rotary settings in rope_parameters (partial_rotary_factor, rope_theta);
    # older exports have top-level rotary_pct / rotary_emb_base.
    rope = cfg.get("rope_parameters") or {}
    legacy = cfg.get(key)
    if legacy is not None:
        return legacy
    return rope.get("partial_rotary_factor" if key == "rotary_pct" else "rope_theta")


def _field(cfg: dict[str, Any], key: str) -> Any:
    return _rotary(cfg, key) if key in ("rotary_pct", "rotary_emb_base") else cfg.get(key)


def check_hf_init(hf_dir: str, model_config: Any, *, model_name: str) -> None:
    """Raise ConfigError (one line) unless `hf_dir` is a GPTNeoX folder with weights and this run's
    shape."""
    path = Path(hf_dir)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"init_from_hf={hf_dir!r} is not a folder (expected a HuggingFace model "
                          f"folder with config.json)")
    cfg = read_json_object(cfg_file, what="a HuggingFace model config", missing_ok=True)
    if cfg is None:
        raise ConfigError(
            f"init_from_hf={hf_dir!r} has no config.json: not a HuggingFace model folder")
    if cfg.get("model_type") != "gpt_neox":
        raise ConfigError(f"init_from_hf: {cfg_file} has model_type={cfg.get('model_type')!r}; "
                          f"only 'gpt_neox' can initialise a NeoX run")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(
            f"init_from_hf={hf_dir!r} holds no weights (expected one of {', '.join(WEIGHT_FILES)})")
    ours = model_config.to_dict()
    diffs = [
        f"{key}={_field(cfg, key)!r} (run's {model_name}: {_field(ours, key)!r})"
        for key in SHAPE_FIELDS
        if _field(cfg, key) is not None and _field(cfg, key) != _field(ours, key)
    ]
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size=") for d in diffs):
            hint = (" (an export made with --unpad-vocab must be re-exported without it, or set "
                    "vocab_size to match)")
        raise ConfigError(
            f"init_from_hf={hf_dir!r} does not match the run's model: {'; '.join(diffs)}{hint}")


def load_hf_model(hf_dir: str, *, attention: str | None = None):
    """The folder's model in fp32 (DeepSpeed casts to bf16 and keeps fp32 masters as the config
    says), with the run's attention kernel (the run config's `attention`), not whatever the folder
    was exported with."""
    import torch  # deferred: see the module docstring

    from neox_train.lm_loss import NeoxForCausalLM

    kwargs = {"attn_implementation": attention} if attention else {}
    return NeoxForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **kwargs)
