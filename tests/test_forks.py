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
from conftest import ROOT, read_metrics, run_script
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
