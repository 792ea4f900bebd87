"""benchmark/roofline.py's work model against torch's own FLOP counter, TRL's phase clock, and a smoke run."""

import json
import time

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from benchmark import roofline, trl_baseline

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=1000)


def matmul_flops(run):
    """The FLOPs torch counts in the linears' matrix products (mm, addmm) of run()."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    counts = counter.get_flop_counts()["Global"]
    return sum(count for op, count in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))


def test_the_matmul_formula_counts_what_torch_counts_in_a_training_pass_and_a_decode_step():
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**SHAPE, rotary_pct=0.25, tie_word_embeddings=False)).eval()
    rows, prompt, response = 3, 5, 4
    ids = torch.randint(0, 1000, (rows, prompt + response))
    h, layers, vocab = 64, 2, 1000
    # the training pass: the output layer only at the positions that predict a response token (logits_to_keep)
    keep = torch.arange(prompt - 1, prompt + response - 1)
    counted = matmul_flops(lambda: model(input_ids=ids, logits_to_keep=keep))
    flops, _ = roofline.pass_work(h, layers, vocab, rows, prompt + response, 0, response, 4)["matmul"]
    assert counted == flops
    # a decode step: one new token per row after `prompt` cached ones, its logits at that token
    with torch.no_grad():
        cache = model(input_ids=ids[:, :prompt], use_cache=True).past_key_values
        counted = matmul_flops(lambda: model(input_ids=ids[:, prompt : prompt + 1], past_key_values=cache,
                                             use_cache=True))
    assert counted == roofline.pass_work(h, layers, vocab, rows, 1, prompt, 1, 4)["matmul"][0]
    # and the roofline of a pass is the slower of its two limits, class by class, at the pass's own precision
    work = {"matmul": (1e9, 1e6), "softmax": (1e3, 1e9)}
    peaks = {"fp32_peak_flops": 1e11, "bf16_peak_flops": 1e12, "bandwidth": 1e10}
    assert roofline.roofline_seconds([(work, "fp32")], peaks) == pytest.approx(1e-2 + 1e-1)
    assert roofline.roofline_seconds([(work, "bf16")], peaks) == pytest.approx(1e-3 + 1e-1)


def test_each_sides_passes_follow_its_update_and_a_micro_batch_reads_the_weights_once():
    args = dict(h=64, layers=2, vocab=1000, prompt=10, response=4, trained=1e6)
    ours = roofline.phase_passes("ours", "rloo", "speed", **args, dtype="fp32")
    trl = roofline.phase_passes("trl", "rloo", "speed", **args, dtype="fp32")
    # ours scores with the reference, the reward model and the policy, whose pass is kept as the one epoch's
    # training forward; TRL takes the old logprobs from generate() and runs the policy again to train
    assert (len(ours["rollout_forward"]), len(ours["training_forward"])) == (3, 0)
    assert (len(trl["rollout_forward"]), len(trl["training_forward"])) == (2, 1)
    assert len(ours["generation"]) == 4  # the prompt's pass, then one per further token
    # PPO's presets: 16 completions in 1 minibatch x 2 micro-batches of 8, 4 epochs: a policy and a value pass per
    # micro-batch, each reading its weights; one optimizer step per epoch
    presets = roofline.phase_passes("ours", "ppo", "presets", **args, dtype="fp32")
    assert len(presets["training_forward"]) == 4 * 2 * 2 and len(presets["optimizer"]) == 4
    one_pass = roofline.pass_work(64, 2, 1000, 8, 14, 0, 4, 4)
    assert presets["training_forward"][0] == (one_pass, "fp32")
    # TRL's bf16 autocasts only the trained module: its reference and reward passes are fp32, ours bf16
    trl_bf16 = roofline.phase_passes("trl", "rloo", "speed", **args, dtype="bf16")
    assert [d for _, d in trl_bf16["rollout_forward"]] == ["fp32", "fp32"]
    assert {d for _, d in trl_bf16["training_forward"]} == {"bf16"}
    assert {d for _, d in roofline.phase_passes("ours", "rloo", "speed", **args, dtype="bf16")["rollout_forward"]} \
        == {"bf16"}


def test_trls_phase_clock_charges_only_the_outermost_call_and_splits_forwards_by_grad_mode():
    clock = trl_baseline.PhaseClock()
    forward = clock.wrap(lambda: time.sleep(0.05))
    generate = clock.wrap(lambda: [forward() for _ in range(3)], "generation")
    generate()  # three forwards inside: generation's, not charged again
    with torch.no_grad():
        forward()
    forward()
    assert set(clock.seconds) == {"generation", "rollout_forward", "training_forward"}
    assert clock.seconds["generation"] >= 0.15
    assert 0.05 <= clock.seconds["rollout_forward"] < 0.15 and 0.05 <= clock.seconds["training_forward"] < 0.15


@pytest.mark.slow
def test_roofline_smoke_run_bounds_every_phase_and_writes_the_table_and_plot(tmp_path, monkeypatch):
    memory_runtime = roofline.memory_runtime
    monkeypatch.setattr(memory_runtime, "build_models",
                        lambda size, root, build=memory_runtime.build_models: build(size, str(tmp_path / "models")))
    prefix = tmp_path / "roofline"
    roofline.main(roofline.Args(size="14m", structures=("speed",), dtypes=("fp32",), algorithms=("rloo",),
                                repeats=1, updates=2, output=str(prefix)))
    record = json.load(open(f"{prefix}.json"))
    assert record["peaks"]["fp32_peak_flops"] > 1e9 and record["peaks"]["bandwidth"] > 1e9
    (row,) = record["rows"]
    phases = row["phases"]
    for phase in ("generation", "rollout_forward", "backward", "optimizer"):
        assert 0 < phases[phase]["ours_fraction"] < 1.5  # no phase beats its bound by far: the counts hold
    # AdamW is one streaming pass over the weights and their state: close to the bandwidth bound
    assert phases["optimizer"]["ours_fraction"] > 0.5
    assert phases["training_forward"]["ours_fraction"] is None  # the one epoch's pass is the rollout's, kept
    table = open(f"{prefix}.md").read()
    assert "| generation |" in table and "not run" in table  # no TRL venv given
    assert open(f"{prefix}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
