"""The math of rloo.py pinned to the blog's worked numbers (MISSION.md items 5 and 6) and to hand-checked cases."""

import math
from types import SimpleNamespace

import pytest
import torch

from rloo import TokenLogprob, ppo_clip_loss, ratio_diagnostics, rloo_advantages, sample


def slow_leave_one_out(rewards, k):
    """Reference: loop over prompts and completions, straight from the definition."""
    batch = len(rewards) // k
    advantages = [0.0] * len(rewards)
    for prompt in range(batch):
        own = [rewards[j * batch + prompt] for j in range(k)]
        for j in range(k):
            advantages[j * batch + prompt] = own[j] - (sum(own) - own[j]) / (k - 1)
    return advantages


def test_leave_one_out_matches_blog_example():
    # 3 prompts x k=4 completions laid out as k blocks of the batch.
    rewards = torch.tensor([1, 2, 3, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=torch.float64)
    advantages = rloo_advantages(rewards, k=4)
    assert advantages[0].item() == pytest.approx(1 - (2 + 5 + 8) / 3)
    assert advantages[7].item() == pytest.approx(6 - (2 + 3 + 9) / 3)
    assert advantages.tolist() == pytest.approx(slow_leave_one_out(rewards.tolist(), 4))


@pytest.mark.parametrize("k,batch", [(2, 5), (3, 1), (4, 3), (8, 2)])
def test_leave_one_out_matches_slow_loop_and_sums_to_zero_per_prompt(k, batch):
    rewards = torch.randn(k * batch, generator=torch.Generator().manual_seed(k * 10 + batch), dtype=torch.float64)
    advantages = rloo_advantages(rewards, k)
    assert advantages.tolist() == pytest.approx(slow_leave_one_out(rewards.tolist(), k))
    assert advantages.reshape(k, batch).sum(0).abs().max().item() < 1e-12


def test_leave_one_out_k2_is_the_reward_difference_and_ties_give_zero():
    # k=2, two prompts: the baseline of each completion is the other one's reward.
    advantages = rloo_advantages(torch.tensor([3.0, 0.5, 1.0, 0.5]), k=2)
    assert advantages.tolist() == [2.0, 0.0, -2.0, 0.0]


def test_sequence_reward_matches_blog_example():
    # The blog's toy uses the raw per-token KL as the per-token reward (kl_coef = -1 in rloo.py's terms)
    # and puts a score of 1.0 on the EOS token: per-token rewards [-1.0, 0.1, 0.7], completion reward -0.2.
    logprobs = torch.tensor([[-12.3, -8.3, -2.3]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-11.3, -8.4, -2.0]], dtype=torch.float64)
    kl = logprobs - ref_logprobs
    assert kl[0].tolist() == pytest.approx([-1.0, 0.1, -0.3])
    kl_coef, score = -1.0, 1.0
    per_token = -kl_coef * kl + torch.tensor([[0.0, 0.0, score]], dtype=torch.float64)
    assert per_token[0].tolist() == pytest.approx([-1.0, 0.1, 0.7])
    rlhf_reward = score - kl_coef * kl.sum(1)  # how rloo.py forms the reward of the whole completion
    assert rlhf_reward.item() == pytest.approx(-0.2)

    # With a dummy per-token baseline [0.2, 0.3, 0.4]: per-token vs whole-completion REINFORCE.
    baseline = torch.tensor([[0.2, 0.3, 0.4]], dtype=torch.float64)
    token_advantages = per_token - baseline
    assert token_advantages[0].tolist() == pytest.approx([-1.2, -0.2, 0.3])
    token_losses = logprobs * token_advantages
    assert token_losses[0].tolist() == pytest.approx([14.76, 1.66, -0.69])
    assert token_losses.mean().item() == pytest.approx(5.2433, abs=1e-4)
    sequence_advantage = rlhf_reward - baseline.sum(1)
    assert sequence_advantage.item() == pytest.approx(-1.1)
    assert (logprobs.sum(1) * sequence_advantage).item() == pytest.approx(25.19)

    # rloo.py's loss on the sequence sum at ratio 1 has the REINFORCE gradient -A on every token.
    new = logprobs.clone().requires_grad_(True)
    loss, clipfrac = ppo_clip_loss(new.sum(1), logprobs.sum(1), sequence_advantage, cliprange=0.2)
    loss.backward()
    assert new.grad[0].tolist() == pytest.approx([1.1, 1.1, 1.1])
    assert loss.item() == pytest.approx(1.1) and clipfrac.item() == 0.0


def test_clip_loss_gradient_equals_reinforce_at_ratio_one_blog_example():
    # logits [1, 2, 1, 1], action 1, advantage 1: both gradients are [-0.1749, 0.5246, -0.1749, -0.1749]
    # (as ascent directions; the losses are their negatives).
    expected = [-0.1749, 0.5246, -0.1749, -0.1749]
    action, advantage = torch.tensor([1]), torch.tensor([1.0])
    logits = torch.tensor([[1.0, 2.0, 1.0, 1.0]], requires_grad=True)
    logprob = TokenLogprob.apply(logits, action, temperature=1.0)
    loss, _ = ppo_clip_loss(logprob, logprob.detach(), advantage, cliprange=0.2)
    loss.backward()
    assert (-logits.grad[0]).tolist() == pytest.approx(expected, abs=1e-4)

    logits_reinforce = torch.tensor([[1.0, 2.0, 1.0, 1.0]], requires_grad=True)
    (TokenLogprob.apply(logits_reinforce, action, 1.0) * advantage).sum().backward()
    assert logits_reinforce.grad[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_clip_loss_zeroes_gradient_only_outside_the_trust_region():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1])).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    loss, clipfrac = ppo_clip_loss(new, old, advantages, cliprange=0.2)
    loss.backward()
    # ratio 1.5 with A > 0 and ratio 0.5 with A < 0 are clipped (no gradient); the other two are not.
    assert new.grad.tolist() == pytest.approx([0.0, 1.5 / 4, 0.0, -1.1 / 4])
    assert clipfrac.item() == 0.5
    # max(-A r, -A clip(r)) per sample: -1.2, 1.5, 0.8, -1.1
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 0.8 - 1.1) / 4, abs=1e-6)


def test_token_logprob_matches_tempered_log_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(TokenLogprob.apply(logits, tokens, 0.7), expected, atol=1e-6)
    assert TokenLogprob.apply(logits.bfloat16(), tokens, 0.7).dtype == torch.float32


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_logprob_gradient_matches_autograd_through_the_log_softmax(dtype, tolerance):
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (3, 5), generator=generator)
    upstream = torch.randn(3, 5, generator=generator)  # what the loss sends back to each logprob
    gradients = []
    for logprobs_of in (TokenLogprob.apply, lambda logits, tokens, temperature: torch.log_softmax(
            logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)):
        logits = (torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(3)) * 3).to(dtype).requires_grad_()
        (logprobs_of(logits, tokens, 0.7) * upstream).sum().backward()
        gradients.append(logits.grad)
    assert gradients[0].dtype == dtype
    assert torch.allclose(gradients[0].float(), gradients[1].float(), atol=tolerance, rtol=tolerance)


def test_sequence_ratio_is_the_product_of_token_ratios():
    generator = torch.Generator().manual_seed(1)
    old = -torch.rand(4, 6, generator=generator) * 3
    new = old + torch.randn(4, 6, generator=generator) * 0.05
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 3:] = False  # a completion that ended early: its padding does not count
    stats = ratio_diagnostics(new, old, mask, cliprange=0.2)
    token_ratio = torch.exp(new - old)
    products = torch.stack([token_ratio[i][mask[i]].prod() for i in range(4)])
    assert stats["diag/ratio_seq_max"] == pytest.approx(products.max().item(), rel=1e-5)
    assert stats["diag/ratio_seq_min"] == pytest.approx(products.min().item(), rel=1e-5)
    assert stats["diag/ratio_token_max"] == pytest.approx(token_ratio[mask].max().item(), rel=1e-6)
    same = ratio_diagnostics(old, old, mask, cliprange=0.2)
    assert same["diag/ratio_token_std"] == 0.0 and same["diag/clipfrac_seq"] == 0.0 and same["diag/ratio_seq_mean"] == 1.0


class ScriptedPolicy:
    """A stand-in policy: its next-token logits are logits_at(step) (one row, or one per query), step counting its
    calls."""

    def __init__(self, logits_at):
        self.logits_at, self.calls = logits_at, 0

    def __call__(self, input_ids, **kwargs):
        logits = self.logits_at(self.calls).expand(len(input_ids), -1)
        self.calls += 1
        return SimpleNamespace(logits=logits.unsqueeze(1), past_key_values=None)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampler_draws_from_the_tempered_softmax_and_never_a_zero_probability_token(temperature):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    policy = ScriptedPolicy(lambda step: probs.log().unsqueeze(0))
    n = 100_000
    torch.manual_seed(0)
    tokens, mask, logprobs = sample(policy, torch.ones(n, 3, dtype=torch.long), 9, None, 1, temperature)
    expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    frequencies = torch.bincount(tokens[:, 0], minlength=len(probs)).double() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((frequencies - expected).abs() <= 5 * sigma + 1e-12).all(), (frequencies, expected)
    assert frequencies[4] == 0 and mask.all()
    assert torch.allclose(logprobs[:, 0], expected.log()[tokens[:, 0]].float(), atol=1e-6)


def test_sampler_pads_after_the_stop_token_and_stops_once_every_row_has_ended():
    stop_id, pad_id, vocab = 2, 9, 4
    # Row r samples token 1 until call r, then token 2 (the stop token): each row of logits is one-hot.
    one_hot = lambda token: torch.full((vocab,), -math.inf).index_fill(0, torch.tensor([token]), 0.0)  # noqa: E731
    policy = ScriptedPolicy(lambda step: torch.stack([one_hot(stop_id if step >= row else 1) for row in range(3)]))
    tokens, mask, logprobs = sample(policy, torch.ones(3, 4, dtype=torch.long), pad_id, stop_id, 8, 0.7)
    assert policy.calls == 3  # the queries' forward and 2 one-token steps: none once every row has stopped
    assert tokens.tolist() == [[2] + [pad_id] * 7, [1, 2] + [pad_id] * 6, [1, 1, 2] + [pad_id] * 5]
    assert mask.sum(1).tolist() == [1, 2, 3] and (logprobs == 0).all()
    policy = ScriptedPolicy(lambda step: torch.full((1, vocab), math.nan))  # what the scripts stop on
    assert sample(policy, torch.ones(2, 4, dtype=torch.long), pad_id, stop_id, 3, 0.7)[2].isnan().all()
    policy = ScriptedPolicy(lambda step: one_hot(stop_id).unsqueeze(0))
    tokens, mask, _ = sample(policy, torch.ones(2, 4, dtype=torch.long), pad_id, None, 5, 0.7)  # no stop token
    assert policy.calls == 5 and (tokens == stop_id).all() and mask.all()
