"""README's "Fork it": every diff in benchmark/forks/ is made against a core and applies, without fuzz, to the core
and to its full script alike, and the fork trains from both. A term added to the loss at the seam acts on the full
script's default preset too, whose first epoch trains on the rollout's own forward, and a statistic the fork adds to
`stats` is logged."""

import glob
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, read_metrics, run_ours, run_script, trl_parity
from safetensors.torch import load_file

FORKS = sorted(glob.glob(os.path.join(ROOT, "benchmark", "forks", "*.diff")))
FORKED = [(diff, full) for diff in FORKS for full in (False, True)]


def fork(diff, directory, full=False):
    """A copy of the diff's core, or of its full script under the core's name, with the diff applied (patch refuses
    a diff whose context has moved; fuzz would mean the full script inserted something beside a seam)."""
    with open(diff) as f:
        script = next(line[len("--- a/"):].strip() for line in f if line.startswith("--- a/"))
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, script.replace(".py", "_full.py") if full else script)
    shutil.copy(os.path.join(ROOT, script.replace(".py", "_full.py") if full else script), target)
    patched = subprocess.run(["patch", "--forward", "--reject-file=-", target, diff], capture_output=True, text=True)
    assert patched.returncode == 0 and "fuzz" not in patched.stdout, patched.stdout + patched.stderr
    return target


def train(script, output_dir, *flags):
    result = run_script(script, "--output-dir", str(output_dir), "--num-sample-generations", "0", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return read_metrics(output_dir)


def test_the_forks_are_small():
    for diff in FORKS:
        with open(diff) as f:
            changed = [line for line in f if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert len(changed) <= 15, (diff, len(changed))
    assert len(FORKS) >= 3


@pytest.mark.parametrize("diff,full", FORKED, ids=[f"{os.path.basename(d)}-{'full' if f else 'core'}" for d, f in FORKED])
def test_each_fork_applies_to_the_core_and_the_full_script_alike(diff, full, tmp_path):
    fork(diff, tmp_path, full)


@pytest.mark.parametrize("diff,full", FORKED, ids=[f"{os.path.basename(d)}-{'full' if f else 'core'}" for d, f in FORKED])
def test_each_fork_trains(diff, full, tmp_path, request):
    if full and not request.config.getoption("--full"):
        pytest.skip("the forks train from the full scripts in the whole suite only: python -m pytest --full")
    metrics = train(fork(diff, tmp_path / "src", full), tmp_path / "run", "--total-episodes", "128")
    assert len(metrics) == 2 and all(abs(m["objective/scores"]) < 100 for m in metrics)


@pytest.mark.slow
def test_the_rule_reward_needs_no_diff(tmp_path):
    metrics = train("rloo_full.py", tmp_path / "run", "--total-episodes", "128", "--reward-model-path", "none",
                    "--reward-fn", os.path.join(ROOT, "benchmark", "forks", "rule_reward.py") + ":rule_reward")
    assert len(metrics) == 2 and metrics[0]["objective/unscored"] == 0


@pytest.mark.slow
def test_a_loss_term_at_the_seam_changes_the_update_of_the_full_scripts_default_preset(tmp_path):
    entropy = fork(os.path.join(ROOT, "benchmark", "forks", "entropy_bonus_rloo.diff"), tmp_path / "src", full=True)
    flags = ("--total-episodes", "64")  # one update of the tiny preset: the kept rollout forward is trained on
    train(os.path.join(ROOT, "rloo_full.py"), tmp_path / "plain", *flags)
    (bonus,) = train(entropy, tmp_path / "bonus", *flags)
    train(entropy, tmp_path / "zero", *flags, "--entropy-coef", "0")
    plain, with_bonus, zero = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "bonus", "zero"))
    assert not all(torch.equal(plain[k], with_bonus[k]) for k in plain)  # the term reached the gradient
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # and it is the only change
    assert bonus["policy/entropy_avg"] > 0  # the fork's statistic, logged without a further edit


# The variants' objectives, written from their papers' equations (not from the forks), on one fixed batch: rewards
# (the scores: the variants take the KL out of the reward), and per token the policy's and the reference's logprobs.
# At the first micro-batch of an update the ratio is 1, so each variant's gradient is sum_it c_it grad log pi_it;
# `papers_objective` returns the advantages, the weights c and the loss there. beta is --kl-coef, k3 Schulman's.
def papers_objective(name, scores, logprobs, ref_logprobs, mask, k, beta, response_length):
    groups = scores.reshape(-1, k)  # canonical order: prompt-major, a prompt's k completions in a row
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    normalised = (centred.reshape(-1, k) / (groups.std(1, keepdim=True) + 1e-4)).flatten()
    leave_one_out = (groups - (groups.sum(1, keepdim=True) - groups) / (k - 1)).flatten()
    log_r = (ref_logprobs - logprobs) * mask  # log pi_ref / pi
    k3, dk3 = log_r.exp() - log_r - 1, (1 - log_r.exp()) * mask  # k3 and d k3 / d log pi
    lengths, completions = mask.sum(1, keepdim=True), len(scores)
    advantages = {"grpo": normalised, "dr_grpo": centred, "dapo": normalised, "gspo": normalised,
                  "k3_kl_loss": leave_one_out}[name]
    token_term = -advantages[:, None] * mask  # -A_i at each real token
    if name == "grpo":  # (1/G) sum_i (1/|o_i|) sum_t [-A_i ratio_it + beta k3_it]
        c, loss = (token_term + beta * dk3) / lengths / completions, ((token_term + beta * k3) / lengths).sum(1).mean()
    elif name == "dr_grpo":  # the same with a constant in the place of |o_i|, and no std in A
        c, loss = (token_term + beta * dk3) / response_length / completions, (
            (token_term + beta * k3) / response_length).sum(1).mean()
    elif name == "dapo":  # (1 / sum_i |o_i|) sum_i sum_t -A_i ratio_it, no KL
        c, loss = token_term / mask.sum(), token_term.sum() / mask.sum()
    elif name == "gspo":  # (1/G) sum_i -A_i s_i, s_i = exp(mean_t log ratio_it): d s_i = (1/|o_i|) sum_t d log pi_it
        c, loss = token_term / lengths / completions, -advantages.mean()
    else:  # RLOO's sequence loss (1/G) sum_i -A_i exp(sum_t log ratio_it), plus beta x each completion's summed k3
        c, loss = (token_term + beta * dk3) / completions, (-advantages + beta * k3.sum(1)).mean()
    return advantages, c, loss


VARIANTS = ["grpo", "dr_grpo", "dapo", "gspo", "k3_kl_loss"]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_computes_its_papers_objective(name, parity_world, tmp_path):
    # One fixed batch (benchmark/trl_parity.py's, RLOO k=2, one micro-batch per update, SGD), two updates through the
    # forked core; each update's advantages, its first loss and its gradient against the paper's formula, the
    # gradient by autograd through a forward of our own, one completion at a time (the second update's weights: the
    # first's, stepped by SGD with the hand gradient). At update 1 the policy is the reference: the KL terms act at 2.
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    root, world = parity_world
    forked = fork(os.path.join(ROOT, "benchmark", "forks", f"{name}.diff"), tmp_path / "src")
    case = "rloo, 1 epoch"
    as_the_core = ("import importlib.util; spec = importlib.util.spec_from_file_location('rloo', "
                   f"{forked!r}); sys.modules['rloo'] = importlib.util.module_from_spec(spec); "
                   "spec.loader.exec_module(sys.modules['rloo'])")  # the harness imports the fork as rloo
    result = run_ours(root, case, tmp_path / "result.json", as_the_core)
    policy = AutoModelForCausalLM.from_pretrained(world["paths"]["sft"])
    for update, recorded in enumerate(result["updates"]):
        tensors = {key: torch.tensor([[0.0 if x is None else x for x in row] if isinstance(row, list) else row
                                      for row in value]) for key, value in recorded["tensors"].items()}
        mask = tensors["response_mask"].bool()
        advantages, c, loss = papers_objective(name, tensors["scores"], tensors["logprobs"], tensors["ref_logprobs"],
                                               mask.float(), 2, trl_parity.KL_COEF, trl_parity.RESPONSE_LENGTH)
        torch.testing.assert_close(tensors["advantages"], advantages, rtol=1e-5, atol=1e-6)
        assert result["losses"][update]["policy"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
        policy.zero_grad()
        for row, cid in enumerate(sorted(recorded["ids"])):
            prompt, completion = world["prompts"][int(cid.split(",")[0])], world["completions"][cid]
            ids = torch.tensor([prompt + completion[: int(mask[row].sum())]])
            logits = policy(ids).logits[0, len(prompt) - 1 : -1].float() / trl_parity.TEMPERATURE
            token_logprobs = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
            (c[row, : len(token_logprobs)] * token_logprobs).sum().backward()
        recorder = trl_parity.Recorder(world, 0)
        recorder.name_parameters(policy.named_parameters())
        recorder.optimizer_step(SimpleNamespace(param_groups=[{"params": list(policy.parameters())}]))
        ours, hand = result["steps"][update], recorder.steps[0]
        assert ours["norm"] == pytest.approx(hand["norm"], rel=1e-4)
        assert abs(ours["projection"] - hand["projection"]) <= 1e-4 * hand["norm"]
        with torch.no_grad():  # the script's SGD step, at the rate it logged
            for param in policy.parameters():
                param -= result["metrics"][update]["lr"] * param.grad
