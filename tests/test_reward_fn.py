"""--reward-fn: a Python function as the score (alone or with the reward model), None for an unscored completion,
and every kind of mistake in the function stopped before it trains anything."""

import json
import os
import textwrap
from statistics import mean

import pytest
import torch
from conftest import ROOT, assert_one_line_error, read_metrics, run_script
from safetensors.torch import load_file

import tiny_world
from rloo import ppo_clip_loss, rloo_advantages

NAN = float("nan")

# A user's reward module: each function is one behaviour the scripts must handle.
REWARDS = '''
import math

def constant(prompts, completions, completion_ids, **columns):
    assert len(prompts) == len(completions) == len(completion_ids) == len(columns["messages"])
    assert all(ids and isinstance(ids[0], int) for ids in completion_ids if ids)
    return [1.0] * len(completions)

def every_other_none(prompts, completions, **columns):
    return [None if i % 2 else 0.5 for i in range(len(completions))]

def all_none(prompts, completions, **columns):
    return [None] * len(completions)

def too_few(prompts, completions, **columns):
    return [0.0] * (len(completions) - 1)

def a_nan(prompts, completions, **columns):
    return [0.0, 0.0, math.nan] + [0.0] * (len(completions) - 3)

def text(prompts, completions, **columns):
    return ["good"] * len(completions)

def buggy(prompts, completions, **columns):
    return [len(c) / 0 for c in completions]
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARDS))
    return str(path)


def tiny(script, output_dir, *flags, episodes=64):
    return run_script(script, "--output-dir", str(output_dir), "--total-episodes", str(episodes), "--save-every", "1",
                      "--num-sample-generations", "0", *flags)


def test_unscored_completions_leave_the_baseline_and_get_advantage_zero():
    # 2 prompts x k=3, as k blocks of the batch: prompt 0 holds (1, None, 4), prompt 1 holds (2, None, None).
    rewards = torch.tensor([1.0, 2.0, NAN, NAN, 4.0, NAN])
    advantages = rloo_advantages(rewards, k=3)
    # prompt 0: each scored completion's baseline is the other scored one; prompt 1 has one scored: all 0
    assert advantages.tolist() == [1.0 - 4.0, 0.0, 0.0, 0.0, 4.0 - 1.0, 0.0]
    # ...and the unscored completion stays in the loss's mean (as in TRL) with a zero term: at ratio 1 the loss is
    # -(sum of advantages) / 6 here, and its gradient reaches only the scored completions.
    logprobs = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0], requires_grad=True)
    loss, _ = ppo_clip_loss(logprobs, logprobs.detach(), advantages, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(advantages.sum().item()) / 6)
    assert logprobs.grad.tolist() == pytest.approx([3 / 6, 0.0, 0.0, 0.0, -3 / 6, 0.0])
    # With every completion scored nothing changes: the leave-one-out baseline over all k.
    scored = torch.tensor([1.0, 2.0, 5.0, 3.0, 4.0, 0.5])
    baseline = (scored.reshape(3, 2).sum(0) - scored.reshape(3, 2)) / 2
    assert torch.equal(rloo_advantages(scored, 3), (scored.reshape(3, 2) - baseline).flatten())


def test_gold_reward_is_the_gold_judges_score():
    prompt = "SUBREDDIT: r/pets TITLE: cat help POST: so cat rent boss TL;DR:"
    assert tiny_world.gold_reward([prompt, prompt], ["cat rent boss", "cat um cat"]) == [1.0, 1 / 3 - 0.25 - 0.25]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rloo_full.py", "ppo_full.py"])
def test_reward_model_and_function_combine_with_their_weights_before_the_eos_penalty(tmp_path, rewards_file, script):
    alone = tiny(script, tmp_path / "alone")
    both = tiny(script, tmp_path / "both", "--reward-fn", f"{rewards_file}:constant", "--reward-fn-weight", "2",
                "--reward-model-weight", "0.5")
    assert alone.returncode == 0 and both.returncode == 0, alone.stderr[-2000:] + both.stderr[-2000:]
    (first_alone,), (first_both,) = read_metrics(tmp_path / "alone"), read_metrics(tmp_path / "both")
    # The same seed samples the same completions before any update; the EOS penalty (1) is taken from the sum.
    assert first_both["val/num_eos_tokens"] == first_alone["val/num_eos_tokens"]
    missing_eos = 1 - first_alone["val/num_eos_tokens"] / first_alone["episode"]
    model_alone = first_alone["objective/scores"] + missing_eos  # the reward model's mean, before the penalty
    assert first_both["objective/scores"] == pytest.approx(0.5 * model_alone + 2.0 - missing_eos, abs=1e-5)
    assert first_both["objective/unscored"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rloo_full.py", "ppo_full.py"])
def test_a_batch_the_function_leaves_unscored_trains_nothing(tmp_path, rewards_file, script):
    # Every completion unscored: advantages 0 (RLOO), no token in either loss (PPO), so AdamW's steps are exact no-ops.
    result = tiny(script, tmp_path / "run", "--reward-fn", f"{rewards_file}:all_none", "--reward-model-path", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = read_metrics(tmp_path / "run")
    assert metrics["objective/unscored"] == 64 and metrics["loss/policy_avg"] == 0.0
    saved, initial = load_file(tmp_path / "run" / "model.safetensors"), load_file(
        f"{tiny_world.ensure_world()['sft_model_path']}/model.safetensors")
    assert all(torch.equal(saved[name], initial[name]) for name in initial)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rloo_full.py", "ppo_full.py"])
def test_none_completions_are_counted_and_the_rest_train(tmp_path, rewards_file, script):
    result = tiny(script, tmp_path / "run", "--reward-fn", f"{rewards_file}:every_other_none", episodes=128)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["objective/unscored"] for m in metrics] == [32, 32]
    assert all(m["loss/policy_avg"] != 0.0 and m["objective/scores"] == m["objective/scores"] for m in metrics)


@pytest.mark.slow
def test_ppo_without_a_reward_model_starts_its_value_model_from_the_sft_backbone(tmp_path):
    result = tiny("ppo_full.py", tmp_path / "run", "--reward-fn", "tiny_world:gold_reward", "--reward-model-path", "none")
    assert result.returncode == 0, result.stderr[-3000:]
    value = load_file(tmp_path / "run" / "value_model" / "model.safetensors")
    assert "score.weight" in value and json.load(open(tmp_path / "run" / "args.json"))["value_model_path"] == (
        tiny_world.ensure_world()["sft_model_path"])


@pytest.mark.parametrize("function,message", [
    ("too_few", "returned 63 values for 64 completions"),
    ("a_nan", "returned nan for completion 2 ("),
    ("text", "returned 'good' for completion 0 ("),
])
@pytest.mark.slow
def test_a_wrong_return_stops_the_run_with_one_line_before_any_step(tmp_path, rewards_file, function, message):
    result = tiny("rloo_full.py", tmp_path / "run", "--reward-fn", f"{rewards_file}:{function}")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert last.startswith(f"error: the reward function my_rewards:{function} (--reward-fn) {message}"), last
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_an_exception_in_the_function_keeps_its_traceback_and_names_it(tmp_path, rewards_file):
    result = tiny("ppo_full.py", tmp_path / "run", "--reward-fn", f"{rewards_file}:buggy", "--reward-model-path", "none")
    assert result.returncode != 0 and "ZeroDivisionError" in result.stderr
    assert f'File "{rewards_file}", line' in result.stderr and "return [len(c) / 0" in result.stderr
    assert "raised inside the reward function my_rewards:buggy" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("flags,message", [
    (["--reward-model-path", "none"], "--reward-model-path none leaves no score: give --reward-fn too"),
    (["--reward-fn", "tiny_world"], "is not module:function or path/to/file.py:function"),
    (["--reward-fn", "no_such_module:f"], "no module 'no_such_module' on the path"),
    (["--reward-fn", "missing.py:f"], "there is no file 'missing.py'"),
    (["--reward-fn", "tiny_world:no_such_function"], "tiny_world has no function 'no_such_function'"),
])
@pytest.mark.slow
def test_a_wrong_reward_fn_flag_gets_one_line(tmp_path, flags, message):
    result = tiny("rloo_full.py", tmp_path / "run", *flags)
    assert_one_line_error(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_the_readmes_example_reads_the_datasets_other_columns_and_its_score_rises(tmp_path):
    # The README's reward function (the share of the reference summary's words, from the dataset's `messages`
    # column; None for an empty completion), RLOO with no reward model: its score must rise.
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = readme.split("## Reward functions (`--reward-fn`)")[1].split("```python")[1].split("```")[0]
    (tmp_path / "my_rewards.py").write_text(example)
    result = tiny("rloo_full.py", tmp_path / "run", "--reward-fn", f"{tmp_path / 'my_rewards.py'}:names_the_reference",
                  "--reward-model-path", "none", episodes=64 * 40)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = [m["objective/scores"] for m in read_metrics(tmp_path / "run")]
    assert mean(scores[-5:]) > mean(scores[:5]) + 0.05, scores  # (+0.065 at 30 updates, seed 1)


@pytest.mark.slow
def test_resume_refuses_an_edited_reward_function_file_unless_told(tmp_path, rewards_file):
    flags = ("--reward-fn", f"{rewards_file}:constant")
    assert tiny("rloo_full.py", tmp_path / "run", *flags).returncode == 0
    with open(rewards_file, "a") as f:
        f.write("\n# edited after the run\n")
    result = tiny("rloo_full.py", tmp_path / "run", *flags, "--resume")
    assert_one_line_error(result, "the file of --reward-fn")
    result = tiny("rloo_full.py", tmp_path / "run", *flags, "--resume", "--resume-anyway")
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr[-3000:]
