"""When the sampler is not the learner: the sampler copy (dtype, staleness), top-p, the rollout correction's weights
and its rollout/* diagnostics."""

import math
import shutil

import pytest
import torch
from conftest import assert_one_line_error, assert_same_run, read_metrics, run_script
from safetensors.torch import load_file

import ppo_full as ppo
import rloo_full as rloo


def tiny(script, output_dir, *flags, episodes=128):
    return run_script(script, "--output-dir", str(output_dir), "--total-episodes", str(episodes),
                      "--num-sample-generations", "0", *flags)


def test_rloo_weights_take_a_whole_completion_per_term():
    # Two completions of 3 tokens (the second has 2 real ones); token ratios e^0.5, e^1, 1 and e^-1, e^2.
    log_ratio = torch.tensor([[0.5, 1.0, 0.0], [-1.0, 2.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    cap = math.exp(0.8)
    ratio, weight, corrected = rloo.rollout_weights(log_ratio, mask, "token-tis", cap)
    assert ratio.tolist() == pytest.approx([math.exp(1.5), math.exp(1.0)])  # padding's 7.0 is left out
    assert weight.tolist() == pytest.approx([math.exp(0.5 + 0.8), math.exp(-1.0 + 0.8)])  # each token truncated
    assert corrected.tolist() == [True, True]
    ratio, weight, corrected = rloo.rollout_weights(log_ratio, mask, "seq-tis", math.exp(1.2))
    assert weight.tolist() == pytest.approx([math.exp(1.2), math.exp(1.0)]) and corrected.tolist() == [True, False]
    ratio, weight, corrected = rloo.rollout_weights(log_ratio, mask, "seq-mis", math.exp(1.2))
    assert weight.tolist() == pytest.approx([0.0, math.exp(1.0)]) and corrected.tolist() == [True, False]
    ratio, weight, corrected = rloo.rollout_weights(log_ratio, mask, "none", math.exp(1.2))
    assert weight.tolist() == [1.0, 1.0] and corrected.tolist() == [False, False]


def test_ppo_weights_are_per_token_or_the_completions_at_each_token():
    log_ratio = torch.tensor([[0.5, 1.0, 0.0], [-1.0, 2.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    cap = math.exp(0.8)
    ratio, weight, corrected = ppo.rollout_weights(log_ratio, mask, "token-tis", cap)
    assert weight[mask].tolist() == pytest.approx([math.exp(0.5), cap, 1.0, math.exp(-1.0), cap])
    assert corrected.tolist() == [[False, True, False], [False, True, False]]
    ratio, weight, corrected = ppo.rollout_weights(log_ratio, mask, "seq-mis", math.exp(1.2))
    assert weight[mask].tolist() == pytest.approx([0.0, 0.0, 0.0, math.exp(1.0), math.exp(1.0)])
    assert ratio[0].tolist() == pytest.approx([math.exp(1.5)] * 3)


def test_rollout_diagnostics_by_hand():
    log_ratio = torch.tensor([[math.log(2.0), 0.0], [math.log(0.5), 0.0]])
    mask = torch.tensor([[True, False], [True, True]])
    ratio = torch.tensor([2.0, 0.5])  # RLOO: one term per completion
    stats = rloo.rollout_diagnostics(log_ratio, mask, ratio, torch.tensor([True, False]))
    k3 = [(2 - 1 - math.log(2)), (0.5 - 1 - math.log(0.5)), 0.0]
    assert stats["rollout/mismatch_kl"] == pytest.approx(sum(k3) / 3)
    assert stats["rollout/is_weight_mean"] == pytest.approx(1.25) and stats["rollout/is_weight_max"] == 2.0
    assert stats["rollout/corrected_share"] == 0.5 and stats["rollout/ess"] == pytest.approx(2.5**2 / (2 * 4.25))


def test_top_p_keeps_the_smallest_set_reaching_p_and_the_sampler_draws_only_from_it():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    assert rloo.outside_top_p(probs.log(), 0.8).tolist() == [[True, False, True, False]]
    assert rloo.outside_top_p(probs.log(), 0.81).tolist() == [[True, False, False, False]]
    assert rloo.outside_top_p(probs.log(), 1.0).tolist() == [[False] * 4]

    class Fixed(torch.nn.Module):  # a "model" whose next-token distribution is always `probs`
        def forward(self, input_ids, **kwargs):
            logits = probs.log().expand(len(input_ids), 1, 4)
            return type("Output", (), {"logits": logits, "past_key_values": None})()

    torch.manual_seed(0)
    tokens, mask, logprobs = rloo.sample(Fixed(), torch.ones(4000, 2, dtype=torch.long), 9, None, 1, 1.0, 0.8)
    counts = torch.bincount(tokens[:, 0], minlength=4).float() / 4000
    assert counts[0] == 0 and counts[2] == 0 and abs(counts[1] - 0.5 / 0.8) < 0.03
    # The sampler's logprob is of the distribution it drew from: renormalised over the nucleus.
    assert logprobs[tokens[:, 0] == 1, 0].unique().tolist() == pytest.approx([math.log(0.5 / 0.8)])


def test_renormalised_learner_logprobs_are_of_its_own_nucleus_and_finite_at_any_sampled_token():
    from transformers import AutoModelForCausalLM

    import tiny_world

    policy = AutoModelForCausalLM.from_pretrained(tiny_world.ensure_world()["sft_model_path"]).eval()
    ids = torch.randint(5, 40, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        full = rloo.policy_forward(policy, ids, mask, 4, 0.7)
        kept = rloo.policy_forward(policy, ids, mask, 4, 0.7, top_p=0.8)
        tempered = full.logits.float() / 0.7
        outside = rloo.outside_top_p(tempered, 0.8).scatter(-1, ids[:, 4:, None], False)
        mass = tempered.softmax(-1).masked_fill(outside, 0.0).sum(-1)
    assert torch.isfinite(kept.logprobs).all()  # random tokens, many outside the nucleus: still finite
    assert torch.allclose(kept.logprobs, full.logprobs - mass.log(), atol=1e-5)
    assert (kept.logprobs >= full.logprobs - 1e-6).all()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rloo_full.py", "ppo_full.py"])
def test_an_fp32_sampler_copy_changes_nothing_and_a_bf16_one_is_measured(tmp_path, script):
    plain = tiny(script, tmp_path / "plain", episodes=64)
    copy = tiny(script, tmp_path / "copy", "--sampler-dtype", "fp32", episodes=64)
    bf16 = tiny(script, tmp_path / "bf16", "--sampler-dtype", "bf16", "--rollout-correction", "seq-tis",
                episodes=64)
    assert plain.returncode == copy.returncode == bf16.returncode == 0, plain.stderr[-2000:] + bf16.stderr[-2000:]
    # An exact copy samples exactly the policy's completions and trains to the same weights; only its sampled
    # logprobs may round differently (a copy's memory layout can change this CPU's kernel paths), in rollout/*.
    (exact,), (copied,), (low,) = (read_metrics(tmp_path / run) for run in ("plain", "copy", "bf16"))
    assert {k: v for k, v in exact.items() if not k.startswith(("time/", "eps", "memory/", "rollout/"))} == {
        k: v for k, v in copied.items() if not k.startswith(("time/", "eps", "memory/", "rollout/"))}
    assert all(abs(exact[k] - copied[k]) < 1e-5 for k in exact if k.startswith("rollout/"))
    plain_weights, copy_weights = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "copy"))
    assert all(torch.equal(plain_weights[k], copy_weights[k]) for k in plain_weights)
    assert 0 <= exact["rollout/mismatch_kl"] < 1e-6 and exact["rollout/is_weight_max"] < 1 + 1e-4
    assert low["rollout/mismatch_kl"] > 100 * max(exact["rollout/mismatch_kl"], 1e-9)
    assert 0 < low["rollout/ess"] <= 1 and low["rollout/is_weight_max"] > 1.001


@pytest.mark.slow
def test_a_stale_sampler_is_corrected_and_resumes_bitwise(tmp_path):
    flags = ["--sampler-sync-every", "4", "--rollout-correction", "seq-mis", "--rollout-correction-cap", "1.5",
             "--save-every", "3", "--keep-checkpoints", "5"]
    run = tiny("rloo_full.py", tmp_path / "run", *flags, episodes=64 * 6)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    # Fresh at updates 1 and 5; stale (and masked above the cap) in between.
    assert metrics[0]["rollout/mismatch_kl"] < 1e-6 and metrics[4]["rollout/mismatch_kl"] < 1e-6
    assert min(metrics[i]["rollout/mismatch_kl"] for i in (1, 2, 3)) > 1e-3
    assert max(metrics[i]["rollout/corrected_share"] for i in (1, 2, 3)) > 0
    # Resumed from update 3's checkpoint, which holds the copy of update 1's weights, the run ends alike.
    shutil.copytree(tmp_path / "run", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "update_0000006")
    (tmp_path / "resumed" / "model.safetensors").unlink()
    resumed = tiny("rloo_full.py", tmp_path / "resumed", *flags, "--resume", episodes=64 * 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "after update 3" in resumed.stdout
    assert_same_run(tmp_path / "run", tmp_path / "resumed")
    uncorrected = tiny("rloo_full.py", tmp_path / "uncorrected", *flags[:2], episodes=64 * 6)
    assert uncorrected.returncode == 0
    a, b = load_file(tmp_path / "run" / "model.safetensors"), load_file(tmp_path / "uncorrected" / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the correction changed the updates


@pytest.mark.parametrize("flags,message", [
    (["--rollout-correction", "seq-tis", "--old-logprobs", "generate"], "--rollout-correction has nothing to correct"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--sampler-sync-every", "0"], "--sampler-sync-every must be >= 1"),
    (["--rollout-correction-cap", "0"], "--rollout-correction-cap must be > 0"),
])
@pytest.mark.slow
def test_bad_sampler_flags_get_one_line(tmp_path, flags, message):
    result = tiny("rloo_full.py", tmp_path / "run", *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run").exists()
