"""README's "Fork it": every diff in benchmark/forks/ still applies to its script at the seam the README names, and
the fork trains on the tiny world. A term added to the loss at the seam acts on the default preset, whose first
epoch trains on the rollout's own forward."""

import glob
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, read_metrics, run_script
from safetensors.torch import load_file

FORKS = sorted(glob.glob(os.path.join(ROOT, "benchmark", "forks", "*.diff")))


def fork(diff, directory):
    """A copy of the diff's script with the diff applied (patch refuses a diff whose context has moved)."""
    with open(diff) as f:
        script = next(line[len("--- a/"):].strip() for line in f if line.startswith("--- a/"))
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(ROOT, script), directory)
    patched = subprocess.run(["patch", "--forward", "--reject-file=-", "-p1", "-d", str(directory), "-i", diff],
                             capture_output=True, text=True)
    assert patched.returncode == 0, patched.stdout + patched.stderr
    return os.path.join(directory, script)


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


def test_the_rule_reward_needs_no_diff(tmp_path):
    metrics = train("rloo.py", tmp_path / "run", "--total-episodes", "128", "--reward-model-path", "none",
                    "--reward-fn", os.path.join(ROOT, "benchmark", "forks", "rule_reward.py") + ":rule_reward")
    assert len(metrics) == 2 and metrics[0]["objective/unscored"] == 0


@pytest.mark.parametrize("diff", FORKS, ids=[os.path.basename(d) for d in FORKS])
def test_each_fork_applies_and_trains(diff, tmp_path):
    metrics = train(fork(diff, tmp_path / "src"), tmp_path / "run", "--total-episodes", "128")
    assert len(metrics) == 2 and all(abs(m["objective/scores"]) < 100 for m in metrics)


def test_a_loss_term_at_the_seam_changes_the_update_of_the_default_preset(tmp_path):
    entropy = fork(os.path.join(ROOT, "benchmark", "forks", "entropy_bonus_rloo.diff"), tmp_path / "src")
    flags = ("--total-episodes", "64")  # one update of the tiny preset: the kept rollout forward is trained on
    train(os.path.join(ROOT, "rloo.py"), tmp_path / "plain", *flags)
    train(entropy, tmp_path / "bonus", *flags)
    train(entropy, tmp_path / "zero", *flags, "--entropy-coef", "0")
    plain, bonus, zero = (load_file(tmp_path / run / "model.safetensors") for run in ("plain", "bonus", "zero"))
    assert not all(torch.equal(plain[k], bonus[k]) for k in plain)  # the term reached the gradient
    assert all(torch.equal(plain[k], zero[k]) for k in plain)  # and it is the only change
