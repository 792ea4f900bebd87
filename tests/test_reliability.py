"""Failures a long run must survive or refuse cleanly (issue #7): kill -9, SIGTERM and Ctrl-C followed by a resume
that matches the uninterrupted run bitwise, an existing output directory, changed settings on resume, a corrupt
checkpoint, an unreachable wandb, and a non-finite reward."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, assert_same_run, read_metrics, run_script

pytestmark = pytest.mark.slow  # (the whole suite: python -m pytest --full)

# A few updates, with a checkpoint every second one.
FLAGS = {"rloo": ["--total-episodes", str(64 * 6)], "ppo": ["--total-episodes", str(64 * 4)]}
COMMON = ["--save-every", "2", "--num-sample-generations", "0"]


def start(script, *flags):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}_full.py"), *flags], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def read_until(process, text):
    """The process's output up to and including the first line holding `text` (all of it if none does)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            break
    return "".join(lines)


def checkpoints(output_dir):
    root = output_dir / "checkpoints"
    return sorted(os.listdir(root)) if root.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    runs = {}

    def get(script):
        if script not in runs:
            output_dir = tmp_path_factory.mktemp(script) / "uninterrupted"
            result = run_script(f"{script}_full.py", *FLAGS[script], *COMMON, "--output-dir", str(output_dir))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[script] = output_dir
        return runs[script]

    return get


@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_kill_9_mid_run_then_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted, script):
    output_dir = tmp_path / "run"
    process = start(script, *FLAGS[script], *COMMON, "--output-dir", str(output_dir))
    read_until(process, "update 3/")
    process.kill()  # SIGKILL: no handler runs, whatever the run was doing (maybe writing a checkpoint)
    process.wait()
    assert checkpoints(output_dir)[0] == "update_0000002"
    assert len(read_metrics(output_dir)) >= 3  # logged past its newest checkpoint: those lines are redone
    # As if a crash had cut a later checkpoint and a metrics line short: neither is taken for a finished one.
    with open(output_dir / "metrics.jsonl", "a") as f:
        f.write('{"update": 4, "objective/kl": 0.')
    (output_dir / "checkpoints" / "update_0000099.partial").mkdir()
    (output_dir / "checkpoints" / "update_0000099.partial" / "model.safetensors").write_text("cut short")

    result = run_script(f"{script}_full.py", *FLAGS[script], *COMMON, "--output-dir", str(output_dir), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stdout and "after update" in result.stdout
    assert_same_run(uninterrupted(script), output_dir)


@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_sigterm_finishes_the_update_saves_and_exits_then_resume_matches(tmp_path, uninterrupted, script):
    output_dir = tmp_path / "run"
    process = start(script, *FLAGS[script], *COMMON, "--output-dir", str(output_dir), "--save-every", "100")
    read_until(process, "update 1/")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stopped_after = len(read_metrics(output_dir))
    assert f"stopped by a signal after update {stopped_after}; saved a checkpoint" in output
    assert checkpoints(output_dir) == [f"update_{stopped_after:07d}"]  # --save-every 100 would not have saved one

    # Gradient checkpointing only trades memory for compute, so the resumed run may switch it on and still match.
    result = run_script(f"{script}_full.py", *FLAGS[script], *COMMON, "--output-dir", str(output_dir), "--resume",
                        "--gradient-checkpointing")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(uninterrupted(script), output_dir)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    output_dir = tmp_path / "run"
    # 8 epochs per update, so that the update is still under way when the second Ctrl-C comes.
    process = start("rloo", "--total-episodes", str(64 * 50), "--num-ppo-epochs", "8", "--output-dir", str(output_dir))
    read_until(process, "update 2/")
    process.send_signal(signal.SIGINT)
    read_until(process, "SIGINT: finishing this update")
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 1 and "error: interrupted again; stopped at once" in output, output[-3000:]
    assert "Traceback" not in output and checkpoints(output_dir) == []


def test_an_existing_run_is_never_silently_replaced(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted("rloo"), run)
    before = (run / "metrics.jsonl").read_text()
    for flags, message in [
        ([], "is not empty; choose another directory (rloo_full.py --resume continues a run in it, --overwrite replaces"),
        (["--resume", "--learning-rate", "1e-3"], "--resume needs the interrupted run's settings (its args.json), "
                                                  "but --learning-rate 0.0001 -> 0.001"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    ]:
        result = run_script("rloo_full.py", *FLAGS["rloo"], *COMMON, "--output-dir", str(run), *flags)
        assert result.returncode != 0 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
        assert (run / "metrics.jsonl").read_text() == before
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    (not_a_run / "thesis.tex").write_text("precious")
    for flag in ("--overwrite", "--resume"):
        result = run_script("rloo_full.py", "--output-dir", str(not_a_run), flag)
        assert result.returncode != 0 and "holds no run (no args.json naming its script)" in result.stderr
        assert os.listdir(not_a_run) == ["thesis.tex"] and (not_a_run / "thesis.tex").read_text() == "precious"
    # Nor does rloo_full.py take over a run of ppo_full.py.
    result = run_script("ppo_full.py", "--total-episodes", "64", "--output-dir", str(tmp_path / "ppo_run"))
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--overwrite", "--resume"):
        result = run_script("rloo_full.py", "--output-dir", str(tmp_path / "ppo_run"), flag)
        assert result.returncode != 0 and "holds a run of ppo_full.py, not of rloo_full.py" in result.stderr
    assert (tmp_path / "ppo_run" / "value_model").exists()
    result = run_script("rloo_full.py", "--resume")
    assert result.returncode != 0 and "--resume needs --output-dir" in result.stderr

    # Asked explicitly, --overwrite replaces the run; a finished run resumed has nothing left to do.
    result = run_script("rloo_full.py", "--total-episodes", "64", *COMMON, "--output-dir", str(run), "--overwrite")
    assert result.returncode == 0 and len(read_metrics(run)) == 1 and checkpoints(run) == ["update_0000001"]
    result = run_script("rloo_full.py", "--total-episodes", "64", *COMMON, "--output-dir", str(run), "--resume")
    assert result.returncode == 0 and "after update 1" in result.stdout and len(read_metrics(run)) == 1


def test_a_corrupt_checkpoint_or_metrics_line_gets_one_line_naming_it(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted("rloo"), run)
    newest = run / "checkpoints" / checkpoints(run)[-1]
    (newest / "optimizer.bin").write_bytes(b"not a pickle")
    result = run_script("rloo_full.py", *FLAGS["rloo"], *COMMON, "--output-dir", str(run), "--resume")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"cannot load the checkpoint {newest}" in result.stderr.strip().splitlines()[-1]
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"update": 2, "objective/kl"\n'  # a line damaged on disk
    (run / "metrics.jsonl").write_text("".join(lines))
    result = run_script("rloo_full.py", *FLAGS["rloo"], *COMMON, "--output-dir", str(run), "--resume")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"line 2 of {run / 'metrics.jsonl'} is damaged" in result.stderr.strip().splitlines()[-1]
    assert (run / "metrics.jsonl").read_text() == "".join(lines)


def run_copy(source, directory, *flags):
    """A copy of a script, as a fork is, run from another directory (the project on its import path)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "rloo_full.py")
    with open(path, "w") as f:
        f.write(source)
    return run_script(path, *flags)


def test_resume_refuses_an_edited_script_unless_told_and_a_forks_bug_shows_its_traceback(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted("rloo"), run)
    with open(os.path.join(ROOT, "rloo_full.py")) as f:
        source = f.read()
    edited = source + "\n# an idea\n"
    result = run_copy(edited, tmp_path / "fork", *FLAGS["rloo"], *COMMON, "--output-dir", str(run), "--resume")
    assert result.returncode != 0 and "rloo_full.py has changed since it made the run" in result.stderr
    assert "--resume-anyway" in result.stderr.strip().splitlines()[-1]
    result = run_copy(edited, tmp_path / "fork", *FLAGS["rloo"], *COMMON, "--output-dir", str(run), "--resume",
                      "--resume-anyway")
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr[-2000:]
    # args.json keeps the record of which code ran which updates
    saved = json.load(open(run / "args.json"))
    original = json.load(open(uninterrupted("rloo") / "args.json"))
    assert saved["script_sha256"] != original["script_sha256"] and saved["history"] == [
        {"script": "rloo_full.py", "script_sha256": original["script_sha256"], "first_update": 1, "last_update": 6}]
    # A run of rloo.py from before the core and the full script were split: the refusal says what to add.
    before_split = tmp_path / "before_split"
    shutil.copytree(uninterrupted("rloo"), before_split)
    saved = json.load(open(before_split / "args.json"))
    json.dump({**saved, "script": "rloo.py"}, open(before_split / "args.json", "w"))
    flags = [*FLAGS["rloo"], *COMMON, "--output-dir", str(before_split), "--resume"]
    result = run_script("rloo_full.py", *flags)
    assert "holds a run of rloo.py, not of rloo_full.py; choose another directory (or add --resume-anyway to " \
           "continue it with rloo_full.py)" in result.stderr.strip().splitlines()[-1]
    result = run_script("rloo_full.py", *flags, "--resume-anyway")
    assert result.returncode == 0 and json.load(open(before_split / "args.json"))["history"][0]["script"] == "rloo.py"
    # A bug in a fork is not a foreseeable mistake: Python's traceback names the fork's file and line.
    buggy = source.replace("        advantages = rloo_advantages(rlhf_reward, args.rloo_k)\n",
                           "        advantages = rloo_advantages(rlhf_reward, args.rloo_k) / undefined_name\n")
    assert buggy != source
    result = run_copy(buggy, tmp_path / "buggy", "--total-episodes", "64", "--output-dir", str(tmp_path / "b"))
    assert result.returncode != 0 and "Traceback" in result.stderr and "NameError" in result.stderr
    assert str(tmp_path / "buggy" / "rloo_full.py") in result.stderr


def test_an_unreachable_wandb_falls_back_to_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40, WANDB_INIT_TIMEOUT="3")
    output_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "rloo_full.py"), "--total-episodes", "64", "--track",
                             "--output-dir", str(output_dir)], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb unreachable" in result.stdout and "logging offline" in result.stdout
    assert list((output_dir / "wandb").glob("offline-run-*")) and len(read_metrics(output_dir)) == 1


@pytest.mark.parametrize("script,dtype,broken", [("rloo", "fp32", "reward_scores"), ("ppo", "fp32", "reward_scores"),
                                                 ("rloo", "fp16", "reward_scores"), ("rloo", "fp32", "sample")])
def test_a_non_finite_score_or_sampling_logit_stops_the_run_and_keeps_the_last_good_checkpoint(
        monkeypatch, tmp_path, script, dtype, broken):
    module = importlib.import_module(f"{script}_full")
    exact = getattr(module, broken)
    calls = []

    def nan_from_the_second_update(*args, **kwargs):
        result = exact(*args, **kwargs)
        calls.append(None)
        if len(calls) > 1:  # the tiny preset scores (and samples) a whole update in one call
            # a score, or the logprobs of a row sampled from NaN logits (test_math checks that sample() gives those)
            (result if broken == "reward_scores" else result[2])[0] = float("nan")
        return result

    monkeypatch.setattr(module, broken, nan_from_the_second_update)
    output_dir = tmp_path / "run"
    quantity = "score" if broken == "reward_scores" else "logits in sampling"
    with pytest.raises(SystemExit, match=f"error: update 2: non-finite {quantity}; stopped before the optimizer step.*"
                                         "nothing was saved"):
        module.main(module.parse_args(["--total-episodes", "192", "--save-every", "1", "--dtype", dtype,
                                       "--output-dir", str(output_dir)]))
    assert [m["update"] for m in read_metrics(output_dir)] == [1]  # update 1 was logged, update 2 never was
    assert checkpoints(output_dir) == ["update_0000001"]  # the last good checkpoint stays
    assert not os.path.exists(output_dir / "model.safetensors")  # no policy with NaN weights is saved
    assert json.load(open(output_dir / "checkpoints" / "update_0000001" / "trainer_state.json"))["update"] == 1
