"""Each full script is its core plus insertions: every line of rloo.py is in rloo_full.py, in order, but for the few
named below with their reasons; nothing is inserted next to the lines a fork edits; and the two compute bitwise the
same run (the full script's rollout-forward reuse aside, which is switched off or does not apply). And every script
refuses a bad flag with one line, before the value reaches any arithmetic."""

import importlib
import os
import subprocess

import pytest
import torch
from conftest import ROOT, pythia_flags, read_metrics, run_script
from safetensors.torch import load_file

# The core lines each full script changes (whitespace aside, as `diff -b` compares), and why. Any other change fails.
SHARED = {
    "def policy_forward(model, query_responses, attention_mask, context_length, temperature) -> PolicyOutput:":
        "--top-p-logprobs renormalized: the learner's logprobs over its own nucleus",
    "def sample(model, queries, pad_id, stop_id, max_tokens, temperature):": "--top-p: sampling within the nucleus",
    "yield torch.tensor([[pad_id] * (width - len(prompts[row])) + prompts[row] for row in rows])":
        "--reward-fn: the prompts' dataset rows, for their other columns",
    "prompts = load_prompts(args, tokenizer, accelerator)": "--reward-fn: the dataset's other columns",
    'scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")  # fp16 gradients underflow without it':
        "DeepSpeed scales fp16 losses itself",
    "for update in range(1, args.num_updates + 1):": "--resume: from the update after the checkpoint",
    "unwrapped_policy, chunk_queries, pad_id, stop_id, args.response_length, temperature)":
        "the sampler copy (--sampler-dtype, --sampler-sync-every) samples, with --top-p",
    "context_length, temperature).logprobs": "the reference's logprobs with --top-p-logprobs renormalized",
    "chunk_scores = reward_scores(reward_model, chunk_query_responses, chunk_attention_mask, last_index)":
        "--reward-model-weight, and --reward-model-path none",
    '"eps": update * args.batch_size / (time.time() - start_time),': "--resume: the updates this process ran",
    'if accelerator.distributed_type.name not in ("NO", "MULTI_GPU", "MULTI_CPU"):': "DeepSpeed ZeRO is allowed",
    "return prompts": "--reward-fn: the dataset's other columns",
    "ref_policy = ref_policy.requires_grad_(False).to(device).eval()": "under DeepSpeed, an inference engine",
    "reward_model = reward_model.requires_grad_(False).to(device).eval()": "under DeepSpeed, an inference engine",
    'json.dump({**dataclasses.asdict(args), "script": os.path.basename(__file__)}, f, indent=2)':
        "the run's identity for --resume: the source's hash, --reward-fn's, and the scripts that ran it",
    '"objective/rlhf_reward": g["rlhf_reward"].mean().item(),': "--reward-fn: over the scored completions",
    '"objective/scores": g["scores"].mean().item(),': "--reward-fn: over the scored completions",
}
CHANGED = {
    "rloo": {
        **SHARED,
        "policy, ref_policy, reward_model = load_models(args, dtype, device, tokenizer, prompts)":
            "DeepSpeed's stage and config for the frozen models",
        "parameters = list(policy.parameters())": "LoRA: the adapters only",
        "queries = next(batches).repeat(args.rloo_k, 1).to(device)  # (k * B, Tq)": "--reward-fn: the rows",
        "unwrapped_policy, chunk_query_responses, chunk_attention_mask, context_length, temperature).logprobs":
            "--top-p-logprobs renormalized",
        "with autocast(), accelerator.accumulate(policy):  # (DDP averages at the last micro-batch)":
            "the phase timings",
        "temperature)  # everything the loss below may use": "--top-p-logprobs renormalized",
        "rlhf_reward=rlhf_reward, scores=scores),": "--reward-fn's unscored count and the rollout/* diagnostics",
        "def load_models(args: Args, dtype, device, tokenizer, prompts):": "DeepSpeed's stage and config",
    },
    "ppo": {
        **SHARED,
        "def forward(self, query_responses, attention_mask, context_length, temperature) -> PolicyOutput:":
            "--top-p-logprobs renormalized",
        "output = policy_forward(self.policy, query_responses, attention_mask, context_length, temperature)":
            "--top-p-logprobs renormalized",
        "policy, ref_policy, reward_model, value_model = load_models(args, dtype, device, tokenizer, prompts, pad_id)":
            "DeepSpeed's stage and config for the frozen models",
        "parameters = [*policy.parameters(), *value_model.parameters()]  # one optimizer, one loss: pg + vf_coef * vf":
            "LoRA: the policy's adapters and the whole value model",
        "queries = next(batches).to(device)  # (B, Tq)": "--reward-fn: the rows",
        "chunk_query_responses, chunk_attention_mask, context_length, temperature)": "--top-p-logprobs renormalized",
        "loss_mask, value_mask = response_mask, value_positions(response_mask)":
            "--reward-fn: unscored completions out of the whitening and of both losses",
        "with autocast(), accelerator.accumulate(policy_and_value):  # (DDP averages at the last micro-batch)":
            "the phase timings",
        "temperature)  # everything the loss below may use": "--top-p-logprobs renormalized",
        "value_mask=value_mask.long()),": "--reward-fn's unscored count and the rollout/* diagnostics",
        "args.value_model_path = args.value_model_path or args.reward_model_path":
            "--reward-model-path none: the value model from the SFT policy's backbone",
        "def load_models(args: Args, dtype, device, tokenizer, prompts, pad_id):": "DeepSpeed's stage and config",
        "output_loading_info=True),": "--reward-model-path none: a fresh value head",
    },
}
# The lines a fork edits (README, "Fork it"): in the full script, their 3 lines of context either side are the
# core's, so a core's diff applies to the full script without fuzz.
SEAMS = {
    "rloo": ["advantages = rloo_advantages(rlhf_reward, args.rloo_k)",
             "return torch.where(scored & (others > 0), rewards - baseline, 0.0).flatten()",
             "loss, clipfrac = ppo_clip_loss(new_seq, old_seq, advantages[idx], args.cliprange)",
             "kl = logprobs - ref_logprobs", "non_score_reward = -args.kl_coef * kl.sum(1)",
             '"""how many times during training a table of sample completions is shown"""'],
    "ppo": ["advantages, returns = compute_gae(rewards, values, args.gamma, args.lam)",
            "advantages = masked_whiten(advantages, loss_mask)",
            "loss, clipfrac = ppo_clip_loss(new_logprobs[mask], old_logprobs[mask], advantages[idx][mask],",
            "vf_loss, vf_clipfrac = clipped_value_loss(new_values[vmask], values[idx][vmask],",
            "kl = logprobs - ref_logprobs", "rewards = token_rewards(scores, kl, response_mask, args.kl_coef)",
            "non_score_reward = -args.kl_coef * kl.sum(1)",
            '"""how many times during training a table of sample completions is shown"""'],
}


BAD_FLAGS = {
    "any": [(["--response-length", "0"], "--response-length must be >= 1"),
            (["--total-episodes", "0"], "--total-episodes must be >= 1"),
            (["--per-device-train-batch-size", "0"], "--per-device-train-batch-size must be >= 1"),
            (["--num-ppo-epochs", "0"], "--num-ppo-epochs must be >= 1"),
            (["--max-grad-norm", "-1"], "--max-grad-norm must be > 0"),
            (["--learning-rate", "-1"], "--learning-rate must be >= 0"),
            (["--temperature", "nan"], "--temperature must be > 0")],
    "rloo": [(["--rloo-k", "0"], "--rloo-k must be at least 2"),  # (before any arithmetic with k)
             (["--rloo-k", "1"], "--rloo-k must be at least 2"),
             (["--rloo-k", "3"], "--rloo-k 3 must divide")],
    "ppo": [(["--cliprange-value", "0"], "--cliprange and --cliprange-value must be > 0"),
            (["--lam", "1.5"], "--gamma and --lam must be within [0, 1]"),
            (["--vf-coef", "-1"], "--vf-coef must be >= 0")],
    # TRL's stop_token and stop_token_id: TRL's RLOO lets stop_token=eos override the id; its PPO raises unless the
    # id is 0 (Pythia's EOS). Here any two given together are refused.
    "full": [(["--stop-token-id", "5"], "--stop-token-id needs --stop-token None"),
             (["--stop-token", "eos", "--stop-token-id", "0"], "--stop-token-id needs --stop-token None")],
    "rloo_full": [(["--normalize-reward", "--reward-clip-range", "0"], "--reward-clip-range must be > 0")],
}


@pytest.mark.parametrize("script,flags,message", [
    (script, flags, message) for script in ("rloo", "rloo_full", "ppo", "ppo_full")
    for flags, message in BAD_FLAGS["any"] + BAD_FLAGS[script.removesuffix("_full")]
    + (BAD_FLAGS["full"] + BAD_FLAGS.get(script, []) if script.endswith("_full") else [])])
def test_bad_flags_get_one_line_before_any_arithmetic(script, flags, message):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exited:
        module.check_args(module.parse_args(flags))
    assert str(exited.value.code).startswith("error: ") and message in str(exited.value.code)


def lines(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read().splitlines()


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_the_full_script_is_the_core_with_insertions_and_the_named_changes(algorithm):
    diff = subprocess.run(["diff", "-b", f"{algorithm}.py", f"{algorithm}_full.py"], cwd=ROOT, capture_output=True,
                          text=True).stdout
    changed = [line[2:].strip() for line in diff.splitlines() if line.startswith("< ")]
    assert len(changed) <= 30
    assert [line for line in changed if line not in CHANGED[algorithm]] == []  # a change without a reason
    assert set(CHANGED[algorithm]) - set(changed) == set()  # a reason for a change no longer made


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_nothing_is_inserted_within_three_lines_of_a_seam(algorithm):
    core, full = lines(f"{algorithm}.py"), lines(f"{algorithm}_full.py")
    for seam in SEAMS[algorithm]:
        found = [i for i, line in enumerate(core) if line.strip().startswith(seam)]
        assert len(found) == 1, seam
        context = core[found[0] - 3 : found[0] + 4]
        assert any(full[j : j + len(context)] == context for j in range(len(full))), seam


def test_the_cores_are_short_and_their_loop_comes_early():
    for algorithm, most in (("rloo", 650), ("ppo", 750)):
        core = lines(f"{algorithm}.py")
        start = next(i for i, line in enumerate(core) if line.startswith("    for update in range("))
        end = next(i for i in range(start + 1, len(core)) if core[i].startswith("    ") and core[i][4] != " ")
        loop = "\n".join(core[start:end]).strip().splitlines()
        assert len(core) <= most and start < 400 and len(loop) <= 100, (algorithm, len(core), start, len(loop))


def same_run(core_dir, full_dir):
    """Every metric both log, at every update, and the final weights: bitwise equal."""
    timing = ("time/", "eps", "memory/")
    core, full = read_metrics(core_dir), read_metrics(full_dir)
    assert len(core) == len(full)
    for ours, theirs in zip(core, full):
        assert {k: v for k, v in ours.items() if not k.startswith(timing)} == {
            k: theirs[k] for k in ours if not k.startswith(timing)}
    for weights in ["model.safetensors", "value_model/model.safetensors"]:
        if (core_dir / weights).exists():
            a, b = load_file(core_dir / weights), load_file(full_dir / weights)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights


def train(script, output_dir, *flags):
    result = run_script(script, "--output-dir", str(output_dir), "--num-sample-generations", "0", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed" not in (result.stdout + result.stderr).lower()  # installed, unused, and silent
    return output_dir


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
@pytest.mark.parametrize("flags", [
    ["--num-mini-batches", "2", "--per-device-train-batch-size", "32", "--local-rollout-forward-batch-size", "32"],
    ["full:--no-train-on-rollout-forward"],  # the default preset, the reuse switched off
], ids=["2 minibatches", "default preset"])
def test_the_core_and_its_full_script_compute_the_same_run(tmp_path, algorithm, flags):
    common = [flag for flag in flags if not flag.startswith("full:")]
    only_full = [flag[5:] for flag in flags if flag.startswith("full:")]
    same_run(train(f"{algorithm}.py", tmp_path / "core", "--total-episodes", str(64 * 20), *common),
             train(f"{algorithm}_full.py", tmp_path / "full", "--total-episodes", str(64 * 20), *common, *only_full))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_the_core_and_its_full_script_compute_the_same_run_on_the_pythia_code_path_under_bf16(pythia_like, tmp_path,
                                                                                          algorithm):
    def flags(output_dir):  # 2 updates: RLOO's preset takes 16 completions per update, PPO's 8
        return [*pythia_flags(pythia_like, output_dir, "--total-episodes", "32" if algorithm == "rloo" else "16"),
                "--dtype", "bf16", "--num-sample-generations", "0"]

    for script in (f"{algorithm}.py", f"{algorithm}_full.py"):
        result = run_script(script, *flags(tmp_path / script))
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_metrics(tmp_path / f"{algorithm}.py")) == 2
    same_run(tmp_path / f"{algorithm}.py", tmp_path / f"{algorithm}_full.py")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_training_on_the_rollout_forward_moves_update_one_by_rounding_only(tmp_path, algorithm, capsys):
    # The default preset: the full script trains its first epoch on the rollout's own forward (one pass fewer), the
    # core on a separate training forward over the same completions (shuffled). The same computation, rounded in
    # another order: update 1's gradient norm agrees to rounding, and so do the weights, up to AdamW's step: a
    # parameter whose gradient is near 0 moves by about the learning rate (1e-4) whatever its size, so a rounding
    # difference there can move it by that much (PPO's update is 4 steps). Both are reported.
    core = train(f"{algorithm}.py", tmp_path / "core", "--total-episodes", "64")
    full = train(f"{algorithm}_full.py", tmp_path / "full", "--total-episodes", "64")
    (core_metrics,), (full_metrics,) = read_metrics(core), read_metrics(full)
    a, b = load_file(core / "model.safetensors"), load_file(full / "model.safetensors")
    weights = max((a[k] - b[k]).abs().max().item() for k in a)
    norm = abs(core_metrics["grad_norm"] - full_metrics["grad_norm"]) / core_metrics["grad_norm"]
    with capsys.disabled():
        print(f"\n{algorithm}, update 1, reuse on vs off: grad_norm relative difference {norm:.2e}, "
              f"weights max |difference| {weights:.2e}")
    assert norm < 1e-5 and weights < 1e-4
