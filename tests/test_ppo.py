"""ppo.py, the core: GAE and the value loss against hand-computed cases, the script run as a user runs it, and its
refusals of bad flags, in this process."""

from statistics import mean

import pytest
import torch
from conftest import DIAG_METRICS, TRL_METRICS, pythia_flags, read_metrics, refused, run_script
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import ppo
from ppo import clipped_value_loss, compute_gae, masked_whiten, token_rewards, value_positions


def slow_gae(rewards, values, gamma, lam):
    """Reference: A_t = sum_l (gamma * lam)^l * delta_{t+l}, delta_t = r_t + gamma * V_{t+1} - V_t, V_T = 0."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t] for t in range(T)]
    return [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, T)) for t in range(T)]


def test_gae_matches_hand_computed_case():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, gamma=1.0, lam=0.95)
    # t=2: 1 - 0.7 = 0.3; t=1: (0.7 - 0.6) + 0.95 * 0.3 = 0.385; t=0: (0.6 - 0.5) + 0.95 * 0.385 = 0.46575
    assert advantages[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert returns[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_slow_reference_loop(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 7, generator=generator, dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, gamma, lam)
    for row in range(3):
        assert advantages[row].tolist() == pytest.approx(slow_gae(rewards[row].tolist(), values[row].tolist(), gamma, lam))
    assert torch.allclose(returns, advantages + values)


def test_gae_with_zero_padding_equals_gae_on_the_unpadded_completion():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.3, 0.2, 0.5, 0.0, 0.0]])
    padded, _ = compute_gae(rewards, values, 1.0, 0.95)
    unpadded, _ = compute_gae(rewards[:, :3], values[:, :3], 1.0, 0.95)
    assert torch.allclose(padded[:, :3], unpadded) and padded[:, 3:].abs().max() == 0


def test_score_lands_one_position_after_the_eos_token_as_trl_places_it():
    # Row 0 ends with EOS at index 2: the score comes at index 3, the state after the EOS (TRL's and Huang et al.'s
    # first padding position), whose value is read at the EOS token. Row 1 never ended and row 2's EOS is in the
    # last column: no position is left after them, so the score comes on their last token.
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0, 9.0], [0.1] * 5, [0.2] * 5])
    mask = torch.tensor([[True, True, True, False, False], [True] * 5, [True] * 5])
    rewards = token_rewards(torch.tensor([1.0, -1.0, 2.0]), kl, mask, kl_coef=0.5)
    assert rewards[0].tolist() == pytest.approx([-0.05, -0.1, -0.15, 1.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([-0.05, -0.05, -0.05, -0.05, -1.0 - 0.05])
    assert rewards[2].tolist() == pytest.approx([-0.1, -0.1, -0.1, -0.1, 2.0 - 0.1])
    # Summed over the completion, the per-token rewards are the completion's RLHF reward (as rloo.py forms it).
    assert rewards.sum(1).tolist() == pytest.approx([1.0 - 0.5 * 0.6, -1.0 - 0.5 * 0.5, 2.0 - 0.5 * 1.0])
    values_at = value_positions(mask)
    assert values_at.tolist() == [[True, True, True, True, False], [True] * 5, [True] * 5]
    # So GAE bootstraps the EOS token from the value after it and weights the score by gamma * lambda there.
    values = torch.tensor([[0.5, 0.6, 0.7, 0.9, 0.0]])
    advantages, _ = compute_gae(rewards[:1], values, gamma=1.0, lam=0.95)
    assert advantages[0, 3].item() == pytest.approx(1.0 - 0.9)
    assert advantages[0, 2].item() == pytest.approx(-0.15 + 0.9 - 0.7 + 0.95 * (1.0 - 0.9))


def test_value_loss_clips_around_the_rollout_value():
    old = torch.tensor([0.5, 0.5, 0.5])
    new = torch.tensor([1.0, 0.0, 0.6], requires_grad=True)
    returns = torch.tensor([2.0, 0.0, 2.0])
    loss, clipfrac = clipped_value_loss(new, old, returns, cliprange_value=0.2)
    # Clipped predictions 0.7, 0.3, 0.6: the clipped squared errors 1.69 and 0.09 exceed the unclipped 1.0 and 0.0,
    # so those two samples carry no gradient; the third (within the clip range) has (0.6 - 2.0) / 3.
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09 + 1.96) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    loss.backward()
    assert new.grad.tolist() == pytest.approx([0.0, 0.0, (0.6 - 2.0) / 3])


def test_masked_whiten_uses_only_valid_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    whitened = masked_whiten(values, mask)
    assert whitened[mask].mean().abs() < 1e-6 and whitened[mask].var().item() == pytest.approx(1.0, rel=1e-4)
    assert whitened[0, 3] == 0.0
    assert masked_whiten(values, mask, shift_mean=False)[mask].mean().item() == pytest.approx(2.0)


def test_pythia_code_path_trains_logs_and_saves(pythia_like, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script("ppo.py", *pythia_flags(pythia_like, output_dir, "--total-episodes", "16"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(output_dir)
    assert [m["update"] for m in metrics] == [1, 2]  # 16 episodes / (4 x 2 x 1 minibatch, as Huang et al. and TRL)
    for name in TRL_METRICS + DIAG_METRICS + ["loss/value_avg", "val/clipfrac_avg", "val/explained_variance"]:
        assert all(torch.isfinite(torch.tensor(float(m[name]))) for m in metrics), name
    assert metrics[0]["objective/kl"] == 0.0
    assert all(m["diag/ratio_token_min"] == m["diag/ratio_token_max"] == 1.0 for m in metrics)
    AutoModelForCausalLM.from_pretrained(output_dir)
    value_model = AutoModelForSequenceClassification.from_pretrained(output_dir / "value_model")
    reward_model = AutoModelForSequenceClassification.from_pretrained(pythia_like["reward_model_path"])
    assert not torch.equal(value_model.score.weight, reward_model.score.weight)  # the value model trained


def test_a_value_model_without_a_trained_head_is_refused(pythia_like, tmp_path):
    flags = pythia_flags(pythia_like, tmp_path / "run", "--total-episodes", "32", "--value-model-path",
                         pythia_like["sft_model_path"])  # a causal LM: its score head would be random
    message = refused(ppo, flags)
    assert "value model" in message and "--value-model-path" in message
    assert not (tmp_path / "run").exists()


def test_the_full_scripts_flags_are_refused_with_one_line():
    with pytest.raises(SystemExit) as exited:
        ppo.parse_args(["--reward-fn", "tiny_world:gold_reward"])
    assert "--reward-fn is in ppo_full.py, not in the core ppo.py" in str(exited.value.code)


def test_tiny_preset_runs_end_to_end(tmp_path):
    output_dir = tmp_path / "run"
    result = run_script("ppo.py", "--output-dir", str(output_dir), "--total-episodes", "128")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "update 2/2" in result.stdout and " -> " in result.stdout
    assert "deepspeed" not in (result.stdout + result.stderr).lower()
    metrics = read_metrics(output_dir)
    assert len(metrics) == 2 and all(m["grad_norm"] > 0 for m in metrics)
    AutoModelForCausalLM.from_pretrained(output_dir)


def test_ppo_raises_the_reward_on_the_tiny_world(tmp_path):
    output_dir = tmp_path / "run"
    result = run_script("ppo.py", "--output-dir", str(output_dir), "--total-episodes", str(64 * 40), "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(output_dir)
    scores = [m["objective/scores"] for m in metrics]
    rlhf_reward = [m["objective/rlhf_reward"] for m in metrics]
    first, last = slice(0, 6), slice(-6, None)
    assert mean(scores[last]) > mean(scores[first]) + 0.25, scores
    assert mean(rlhf_reward[last]) > mean(rlhf_reward[first]) + 0.2, rlhf_reward
    assert metrics[-1]["val/explained_variance"] > metrics[0]["val/explained_variance"]  # the critic learns
