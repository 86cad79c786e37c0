"""The memory planner: model-state bytes against hand-computed numbers, the activation formula, the
choice for neox-1.2b on 1-64 GPUs of 24/40/80 GB, batch arithmetic in every plan, and the
`neox-launch --plan` output."""

from __future__ import annotations

import json

import pytest

from neox_train.cli.launch import main
from neox_train.config import load_run_config
from neox_train.ds_config import OFFLOAD_ALL, OFFLOAD_NONE, OFFLOAD_OPTIMIZER
from neox_train.launch import memory, planner
from neox_train.launch.memory import Variant
from neox_train.launch.planner import PlanError
from neox_train.units import GIB

# neox-1.2b (the Pythia-1.4B shape) with GPT-2's vocabulary padded to 50304: the published parameter
# count, and its largest module, the untied output head (50304 x 2048).
P = 1_414_647_808
LARGEST = 50304 * 2048
GPU_COUNTS = (1, 2, 4, 8, 16, 64)
MEM_SIZES = (24, 40, 80)


@pytest.fixture(scope="module")
def production():
    return load_run_config("production")


@pytest.fixture(scope="module")
def shape():
    return memory.model_shape("neox-1.2b", 50304)


def hand_model_states(stage: int, offload: str, n: int) -> int:
    """Bytes per GPU, written out from the ZeRO paper's bookkeeping as DeepSpeed's estimators count
    it: 2 bytes of bf16 weights, 2 of bf16 grads, 4 of fp32 grads, 4 of fp32 master weights, 8 of
    Adam moments."""
    if offload == OFFLOAD_OPTIMIZER:  # ZeRO-2 offload: only the bf16 weights stay on the GPU
        return 2 * P
    if offload == OFFLOAD_ALL:  # ZeRO-3 offload: only the layer being gathered
        return 4 * LARGEST
    if stage == 1:  # weights and grads whole, the rest partitioned
        return 2 * P + 2 * P + 16 * P // n
    if stage == 2:  # weights whole, grads and the rest partitioned
        return 2 * P + 18 * P // n
    return 4 * LARGEST + 18 * P // n  # stage 3: everything partitioned, one layer gathered


def test_shape_is_the_published_model(shape):
    assert shape.total_params == P
    assert shape.largest_layer_params == LARGEST
    assert ((shape.hidden_size, shape.num_layers, shape.num_heads, shape.vocab_size)
            == (2048, 24, 16, 50304))


@pytest.mark.parametrize("n", GPU_COUNTS)
@pytest.mark.parametrize("variant", [Variant(1), Variant(2), Variant(3),
                                     Variant(2, OFFLOAD_OPTIMIZER),
                                     Variant(3, OFFLOAD_ALL)], ids=lambda v: v.ds_name)
def test_model_states_match_hand_computed_bytes(shape, variant, n):
    nodes = -(-n // 8)
    gpu, cpu = memory.model_state_bytes(variant, shape, gpus=n, nodes=nodes, precision="bf16")
    assert gpu == hand_model_states(variant.stage, variant.offload, n)
    assert cpu > 0


def test_model_states_literal_values(shape):
    """A few values computed by hand, so a change in DeepSpeed's estimators shows up here by
    number."""
    def gpu(variant, n):
        return memory.model_state_bytes(variant, shape, gpus=n, nodes=1, precision="bf16")[0]

    assert gpu(Variant(2), 8) == 6_012_253_184  # 2P + 18P/8
    assert gpu(Variant(1), 1) == 28_292_956_160  # 20P
    # 4 * 103,022,592 + 18P/64 = 412,090,368 + 397,869,696
    assert gpu(Variant(3), 64) == 809_960_064
    assert gpu(Variant(2, OFFLOAD_OPTIMIZER), 1) == 2_829_295_616  # 2P


def test_stage0_and_fp32_accounting(shape):
    bf16 = memory.model_state_bytes(Variant(0), shape, gpus=2, nodes=1, precision="bf16")[0]
    fp32 = memory.model_state_bytes(Variant(0), shape, gpus=2, nodes=1, precision="fp32")[0]
    # bf16 weights, grads and two bf16 Adam moments: DeepSpeed's stage-0 bf16 path
    assert bf16 == 8 * P
    assert fp32 == 16 * P  # fp32 weights, grads, two moments
    # fp32 at ZeRO-2: weights 4 bytes (whole), gradients 4 bytes (partitioned) instead of 2.
    z2 = memory.model_state_bytes(Variant(2), shape, gpus=4, nodes=1, precision="fp32")[0]
    assert z2 == 2 * P + 18 * P // 4 + 2 * P + 2 * P // 4


def test_activation_and_logit_bytes_hand_computed(shape):
    sbh = 2048 * 4 * 2048  # seq x micro-batch x hidden
    no_ckpt = memory.activation_bytes(shape, seq_len=2048, micro_batch=4, precision="bf16",
                                      checkpointing=False)
    ckpt = memory.activation_bytes(shape, seq_len=2048, micro_batch=4, precision="bf16",
                                   checkpointing=True)
    assert no_ckpt == 24 * 34 * sbh + 4 * sbh == 13_757_317_120
    assert ckpt == 24 * 2 * sbh + 34 * sbh + 4 * sbh == 1_442_840_576
    fp32 = memory.activation_bytes(shape, seq_len=2048, micro_batch=4, precision="fp32",
                                   checkpointing=False)
    assert fp32 == 2 * no_ckpt
    assert (memory.logits_bytes(shape, seq_len=2048, micro_batch=4) == 12 * 4 * 2048 * 50304
            == 4_945_084_416)
    eager = memory.ModelShape(**{**shape.__dict__, "attention": "eager"})
    # Eager attention keeps the s x s scores, softmax and dropout per head: Korthikanti's 5*a*s^2*b
    # per layer.
    assert (memory.activation_bytes(eager, seq_len=2048, micro_batch=4, precision="bf16",
                                    checkpointing=False)
            - no_ckpt) == 24 * 5 * 16 * 2048 * 2048 * 4


def test_comm_buffers_follow_the_json(production):
    req = planner.request_from_run(production, gpus=8, nodes=1, gpu_mem_gib=80,
                                   gpu_mem_source="test")
    def buffers(v):
        return memory.comm_buffer_bytes(v, req.zero_section(v), precision="bf16", gpus=8)

    # one bf16 bucket (overlap_comm off by default below stage 3)
    assert buffers(Variant(1)) == 500_000_000 * 2
    assert buffers(Variant(2)) == 2 * 500_000_000 * 2  # overlap_comm: double-buffered
    assert buffers(Variant(3)) == 2 * 500_000_000 * 2 + 50_000_000 * 2  # + the prefetch bucket
    # one GPU: no all-reduce
    assert memory.comm_buffer_bytes(Variant(0), {}, precision="fp32", gpus=1) == 0


# What the planner chooses for the production config (neox-1.2b, seq 2048, micro 4 x accumulation 4,
# bf16, the chunked loss): (zero stage, offload, activation checkpointing, micro-batch). On 24 GB
# cards the 13 GiB of activations of micro-batch 4 leave room for ZeRO-2 with the optimizer on the
# host up to 4 GPUs, no offload from 8; from 40 GB ZeRO-1 fits. No plan needs activation
# checkpointing.
EXPECTED = {
    (1, 24): (2, OFFLOAD_OPTIMIZER, False, 4), (1, 40): (2, OFFLOAD_OPTIMIZER, False, 4),
    (1, 80): (1, OFFLOAD_NONE, False, 4),
    (2, 24): (2, OFFLOAD_OPTIMIZER, False, 4), (2, 40): (1, OFFLOAD_NONE, False, 4),
    (2, 80): (1, OFFLOAD_NONE, False, 4), (4, 24): (2, OFFLOAD_OPTIMIZER, False, 4),
    (4, 40): (1, OFFLOAD_NONE, False, 4), (4, 80): (1, OFFLOAD_NONE, False, 4),
    (8, 24): (3, OFFLOAD_NONE, False, 4), (8, 40): (1, OFFLOAD_NONE, False, 4),
    (8, 80): (1, OFFLOAD_NONE, False, 4), (16, 24): (2, OFFLOAD_NONE, False, 4),
    (16, 40): (1, OFFLOAD_NONE, False, 4), (16, 80): (1, OFFLOAD_NONE, False, 4),
    (64, 24): (1, OFFLOAD_NONE, False, 4), (64, 40): (1, OFFLOAD_NONE, False, 4),
    (64, 80): (1, OFFLOAD_NONE, False, 4),
}
# The same with the whole logits (loss_chunk 0): 4.6 GiB more per GPU, and on 24 GB cards the
# parameters go to the host too.
WHOLE_LOGITS_24GB = {1: (3, OFFLOAD_ALL), 2: (3, OFFLOAD_ALL), 4: (3, OFFLOAD_ALL),
                     8: (3, OFFLOAD_ALL), 16: (3, OFFLOAD_ALL), 64: (3, OFFLOAD_NONE)}


@pytest.fixture(scope="module")
def table(production):
    return planner.plan_table(
        lambda g, n, m: planner.request_from_run(production, gpus=g, nodes=n, gpu_mem_gib=m,
                                                 gpu_mem_source="table"),
        list(GPU_COUNTS), list(MEM_SIZES))


def test_plan_table_choices(table):
    got = {(r["gpus"], r["gpu_mem_gb"]):
           (r["zero_stage"], r["offload"], r["activation_checkpointing"], r["micro_batch"])
           for r in table}
    assert got == EXPECTED


def test_the_chunked_loss_is_counted_and_the_whole_logits_cost_offload(production):
    chunked = planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=24,
                                       gpu_mem_source="test")
    whole = planner.request_from_run(production.replace(loss_chunk=0), gpus=1, nodes=1,
                                     gpu_mem_gib=24, gpu_mem_source="test")
    lean = memory.logits_bytes(chunked.shape, seq_len=2048, micro_batch=4)
    full = memory.logits_bytes(whole.shape, seq_len=2048, micro_batch=4)
    assert full == 12 * 4 * 2048 * 50304 and lean == 10 * 1024 * 50304 + 4 * 50304 * 2048
    assert lean / full < 0.2
    assert "loss 0.86 GiB (chunks of 1024 tokens)" in planner.choose(chunked).reason
    for gpus, (stage, offload) in WHOLE_LOGITS_24GB.items():
        plan = planner.choose(planner.request_from_run(
            production.replace(loss_chunk=0), gpus=gpus, nodes=1, gpu_mem_gib=24,
            gpu_mem_source="test"))
        assert (plan.variant.stage, plan.variant.offload) == (stage, offload)
        assert not plan.activation_checkpointing and "logits 4.61 GiB" in plan.reason


def test_every_plan_is_consistent(table):
    assert len(table) == len(GPU_COUNTS) * len(MEM_SIZES)
    for r in table:
        n = r["gpus"]
        # Batch arithmetic: the configured 16 sequences per GPU per step, whatever the micro-batch
        # became.
        assert r["micro_batch"] * r["grad_accum"] == 16
        assert r["train_batch"] == r["micro_batch"] * r["grad_accum"] * n
        # The estimate is its parts, fits the usable memory, and the usable memory is the stated
        # headroom.
        parts = r["est_breakdown_gb"]
        assert abs(sum(parts.values()) - r["est_gb_per_gpu"]) < 0.05
        assert r["fits"] is True and r["est_gb_per_gpu"] <= r["usable_gb_per_gpu"]
        assert r["usable_gb_per_gpu"] == round(r["gpu_mem_gb"] * 0.9 - 1.0, 2)
        # Model states are DeepSpeed's bytes for the chosen variant.
        assert parts["model_states"] == round(
            hand_model_states(r["zero_stage"], r["offload"], n) / GIB, 2)
        # Everything tried before the choice did not fit, and the choice is the last thing tried.
        assert all(c["fits"] is False for c in r["considered"][:-1])
        last = r["considered"][-1]
        assert ((last["zero_stage"], last["offload"], last["fits"])
                == (r["zero_stage"], r["offload"], True))
        assert r["nodes"] == -(-n // 8)


def test_format_table(table):
    text = planner.format_table(table)
    lines = text.splitlines()
    assert len(lines) == 2 + len(table)
    assert lines[2].startswith("| 1 | 24 GB | 2 | optimizer | no | 4 x 4 | 16 |")
    assert "| 64 | 80 GB | 1 | none | no | 4 x 4 | 1024 |" in text


def test_micro_batch_lowered_when_nothing_else_fits(production):
    req = planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=6,
                                   gpu_mem_source="test")
    plan = planner.choose(req)
    assert (plan.micro_batch, plan.grad_accum, plan.train_batch) == (2, 8, 16)
    assert plan.variant == Variant(3, OFFLOAD_ALL) and plan.activation_checkpointing
    assert "Micro-batch lowered 4 -> 2" in plan.reason
    assert "Activation checkpointing: nothing fits without it, at any micro-batch" in plan.reason


def test_a_lower_micro_batch_is_preferred_to_activation_checkpointing(production):
    """10 GiB: micro-batch 4 fits only with every layer recomputed (4.6 GiB); micro-batch 1 fits
    without (6.4 of 8 usable): a third less compute for a smaller matmul."""
    plan = planner.choose(planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=10,
                                                   gpu_mem_source="test"))
    assert (plan.micro_batch, plan.grad_accum, plan.activation_checkpointing) == (1, 16, False)
    assert "No activation checkpointing: the plan fits without it" in plan.reason
    assert "Micro-batch lowered 4 -> 1" in plan.reason


def test_nothing_fits_is_one_line_with_the_numbers(production):
    req = planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=4,
                                   gpu_mem_source="test")
    with pytest.raises(PlanError) as err:
        planner.choose(req)
    text = str(err.value)
    assert "\n" not in text
    assert ("neox-1.2b (1,414,647,808 parameters" in text
            and "1 GPU of 4 GiB (usable 2.6 GiB each)" in text)
    assert ("activation checkpointing at micro-batch 1, needs 3.54 GiB per GPU" in text
            and "use more GPUs" in text)


def test_forced_stage_warns_when_it_will_not_fit(production):
    req = planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=24,
                                   gpu_mem_source="test", forced_stage=1)
    plan = planner.choose(req)
    assert plan.zero_stage == 1 and plan.fits is False
    assert len(plan.warnings) == 1 and "--zero 1 will not fit 1 GPU of 24 GiB" in plan.warnings[0]
    req = planner.request_from_run(production, gpus=8, nodes=1, gpu_mem_gib=80,
                                   gpu_mem_source="test", forced_stage=3)
    plan = planner.choose(req)
    assert plan.variant == Variant(3) and plan.fits is True and not plan.warnings
    req = planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=40,
                                   gpu_mem_source="test", forced_stage=3, forced_offload=True)
    assert planner.choose(req).variant == Variant(3, OFFLOAD_ALL)
    with pytest.raises(PlanError, match="--offload needs --zero 2 or 3"):
        planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=40, gpu_mem_source="test",
                                 forced_stage=1, forced_offload=True)


def test_bf16_never_plans_stage0_but_fp32_does(production):
    assert Variant(0) not in memory.ladder("bf16")
    assert memory.ladder("fp32")[0] == Variant(0)
    small = production.replace(model="neox-160m", mixed_precision="no", seq_len=512)
    plan = planner.choose(planner.request_from_run(small, gpus=2, nodes=1, gpu_mem_gib=80,
                                                   gpu_mem_source="test"))
    assert plan.variant == Variant(0) and plan.precision == "fp32"


def test_unknown_memory_keeps_the_configured_variant(production):
    req = planner.request_from_run(production, gpus=2, nodes=1, gpu_mem_gib=None,
                                   gpu_mem_source="no CUDA device")
    plan = planner.choose(req)
    assert plan.variant == Variant(2) and plan.fits is None  # production's JSON is zero2
    assert (plan.micro_batch, plan.grad_accum, plan.train_batch) == (4, 4, 32)
    assert "GPU memory unknown (no CUDA device)" in plan.reason


def test_resolved_ds_config_keeps_the_users_sections(production):
    from neox_train.ds_config import load_ds_config

    req = planner.request_from_run(production, gpus=1, nodes=1, gpu_mem_gib=40,
                                   gpu_mem_source="test")
    plan = planner.choose(req)
    _, base = load_ds_config(production.ds_config)
    cfg = planner.resolved_ds_config(base, plan, req)
    _, shipped = load_ds_config("zero2_offload")
    assert cfg["zero_optimization"] == shipped["zero_optimization"]
    assert cfg["optimizer"] == base["optimizer"] and cfg["scheduler"] == base["scheduler"]
    batch = (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"],
             cfg["train_batch_size"])
    assert batch == (4, 4, 16)


def test_neox_launch_plan_json(capsys):
    assert main(["--plan", "--json", "--gpus", "2", "--gpu-mem-gb", "24", "--config",
                 "production"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out)  # exactly one JSON object on stdout
    for key in ("zero_stage", "offload", "micro_batch", "grad_accum", "train_batch",
                "est_gb_per_gpu", "reason"):
        assert key in plan
    assert (plan["zero_stage"], plan["offload"], plan["train_batch"]) == (2, OFFLOAD_OPTIMIZER, 32)


def test_neox_launch_plan_table(capsys):
    assert main(["--plan", "--table", "--config", "production", "--table-gpus", "1,8",
                 "--table-mem-gb", "40,80"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 4
    assert lines[2].startswith("| 1 | 40 GB | 2 | optimizer |")


def test_neox_launch_forced_zero_warns(capsys):
    assert main(["--plan", "--json", "--gpus", "1", "--gpu-mem-gb", "24", "--zero", "1",
                 "--config", "production"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["zero_stage"] == 1
    assert "neox-launch: warning: --zero 1 will not fit" in captured.err
