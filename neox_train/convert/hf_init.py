"""`--init-from-hf DIR`: continued pretraining from a HuggingFace GPTNeoX folder.

The folder's shape is checked against the run's model (cheap: config.json only) before any process group or
engine exists; the weights are then loaded by transformers itself (`from_pretrained`), which also handles
ZeRO-3 partitioned construction when an HfDeepSpeedConfig is alive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neox_train.errors import ConfigError

# The fields that decide the parameter shapes and the computation; anything else (dtype, ids, bookkeeping) may
# differ between an export and a training preset.
SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size", "rotary_pct",
    "rotary_emb_base", "use_parallel_residual", "tie_word_embeddings", "hidden_act", "layer_norm_eps",
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _rotary(cfg: dict[str, Any], key: str) -> Any:
    # transformers 5 keeps rotary settings in rope_parameters (partial_rotary_factor, rope_theta); older exports
    # have top-level rotary_pct / rotary_emb_base.
    rope = cfg.get("rope_parameters") or {}
    legacy = cfg.get(key)
    if legacy is not None:
        return legacy
    return rope.get("partial_rotary_factor" if key == "rotary_pct" else "rope_theta")


def _field(cfg: dict[str, Any], key: str) -> Any:
    return _rotary(cfg, key) if key in ("rotary_pct", "rotary_emb_base") else cfg.get(key)


def check_hf_init(hf_dir: str, model_config: Any, *, model_name: str) -> None:
    """Raise ConfigError (one line) unless `hf_dir` is a GPTNeoX folder with weights and this run's shape."""
    path = Path(hf_dir)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ConfigError(f"init_from_hf={hf_dir!r} is not a folder (expected a HuggingFace model folder with config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"init_from_hf={hf_dir!r} has no config.json: not a HuggingFace model folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"init_from_hf: {cfg_file} is not valid JSON: {' '.join(str(e).split())}") from None
    if cfg.get("model_type") != "gpt_neox":
        raise ConfigError(f"init_from_hf: {cfg_file} has model_type={cfg.get('model_type')!r}; only 'gpt_neox' can initialise a NeoX run")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"init_from_hf={hf_dir!r} holds no weights (expected one of {', '.join(WEIGHT_FILES)})")
    ours = model_config.to_dict()
    diffs = [
        f"{key}={_field(cfg, key)!r} (run's {model_name}: {_field(ours, key)!r})"
        for key in SHAPE_FIELDS
        if _field(cfg, key) is not None and _field(cfg, key) != _field(ours, key)
    ]
    if diffs:
        hint = ""
        if any(d.startswith("vocab_size=") for d in diffs):
            hint = " (an export made with --unpad-vocab must be re-exported without it, or set vocab_size to match)"
        raise ConfigError(f"init_from_hf={hf_dir!r} does not match the run's model: {'; '.join(diffs)}{hint}")


def load_hf_model(hf_dir: str, *, attention: str | None = None):
    """The folder's model in fp32 (DeepSpeed casts to bf16 and keeps fp32 masters as the config says), with the
    run's attention kernel (the run config's `attention`), not whatever the folder was exported with."""
    import torch
    from transformers import GPTNeoXForCausalLM

    kwargs = {"attn_implementation": attention} if attention else {}
    return GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **kwargs)
