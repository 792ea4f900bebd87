"""The bf16 ratio study: the diagnostics measure what they claim, and the `forward` old-logprob source is exact."""

import importlib
import json
import os
import subprocess

import pytest
import torch
from conftest import ROOT, read_metrics, run_script

from benchmark import compare_runs, ratio_diagnostics


def test_generate_logprobs_match_the_training_forward_in_fp32_on_the_tiny_world():
    settings, tokenizer, policy, queries = ratio_diagnostics.load(ratio_diagnostics.Args(num_sequences=16))
    rows = {r["comparison"]: r for r in ratio_diagnostics.measure(policy, tokenizer, queries, "fp32", settings, 0.2, 1)}
    for comparison in ("generate", "(a) one full forward vs KV-cache decoding, same batch"):
        row = rows[comparison]
        assert 1 - 1e-4 < row["ratio_token_min"] <= row["ratio_token_max"] < 1 + 1e-4, row
    # In fp32 the "low precision" is fp32 itself: both (c) comparisons are of identical computations.
    for comparison in [c[0] for c in ratio_diagnostics.COMPARISONS if c[0].startswith("(c)")]:
        assert rows[comparison]["ratio_token_min"] == rows[comparison]["ratio_token_max"] == 1.0, comparison


@pytest.mark.parametrize("script,dtype", [("rloo.py", "bf16"), ("ppo.py", "bf16"), ("rloo.py", "fp16")])
def test_forward_source_makes_the_first_minibatch_ratio_exactly_one(tmp_path, script, dtype):
    runs = {}
    for source in ("forward", "generate"):
        output_dir = tmp_path / source
        result = run_script(script, "--dtype", dtype, "--old-logprobs", source, "--total-episodes", "128",
                            "--output-dir", str(output_dir))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[source] = read_metrics(output_dir)
    for m in runs["forward"]:
        assert m["diag/ratio_token_min"] == m["diag/ratio_token_max"] == 1.0 and m["diag/ratio_token_std"] == 0.0
        assert m["diag/ratio_seq_min"] == m["diag/ratio_seq_max"] == 1.0
        assert m["diag/clipfrac_token"] == m["diag/clipfrac_seq"] == 0.0
    assert runs["forward"][0]["objective/kl"] == 0.0  # the rollout forward and the reference agree exactly
    # The generate source under low precision is measurably off 1, and so is its KL before any update:
    # the diagnostics see the mismatch they exist to report.
    first = runs["generate"][0]
    assert first["diag/ratio_token_std"] > 0 and first["diag/ratio_token_min"] < 1 < first["diag/ratio_token_max"]
    assert first["objective/kl"] != 0.0


@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_first_minibatch_ratio_is_one_even_when_the_rollout_forward_disagrees(monkeypatch, tmp_path, script):
    # On this CPU a separate no-grad forward already matches the training forward bit for bit; GPU kernels can
    # depend on the batch shape. Make the rollout pass disagree, as such kernels would: the first minibatch must
    # still see a ratio of exactly 1 (its old logprobs are its own forward), and only later minibatches may not.
    module = importlib.import_module(script)
    exact = module.response_logprobs
    noise = torch.Generator().manual_seed(0)

    def rollout_disagrees(*args, **kwargs):
        logprobs = exact(*args, **kwargs)
        if torch.is_grad_enabled():
            return logprobs
        return logprobs + 1e-3 * torch.randn(logprobs.shape, generator=noise)

    monkeypatch.setattr(module, "response_logprobs", rollout_disagrees)
    output_dir = tmp_path / "run"
    # Learning rate 0: the policy never moves, so any ratio off 1 is the rollout pass's disagreement.
    module.main(module.parse_args(["--total-episodes", "256", "--num-mini-batches", "2", "--num-ppo-epochs", "1",
                                   "--learning-rate", "0", "--output-dir", str(output_dir)]))
    for m in read_metrics(output_dir):
        assert m["diag/ratio_token_min"] == m["diag/ratio_token_max"] == 1.0 and m["diag/clipfrac_seq"] == 0.0
        assert m["val/ratio_var"] > 0  # the second minibatch's old logprobs are the (disagreeing) rollout's


def test_benchmark_runs_the_pythia_code_path_and_writes_tables(pythia_like, tmp_path):
    output = tmp_path / "ratio.json"
    result = run_script("benchmark/ratio_diagnostics.py", "--model", "pythia-1b",
                        "--sft-model-path", pythia_like["sft_model_path"],
                        "--tokenizer-path", pythia_like["tokenizer_path"], "--dataset-name", pythia_like["dataset_name"],
                        "--num-sequences", "8", "--response-length", "12", "--precisions", "fp32", "bf16-weights",
                        "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.load(open(output))
    rows = {(r["precision"], r["comparison"]): r for r in saved["rows"]}
    assert len(rows) == 2 * len(ratio_diagnostics.COMPARISONS)
    assert rows["fp32", "forward (a separate pass)"]["ratio_token_std"] == 0.0
    assert rows["bf16-weights", "(d) the policy in fp32 vs in the precision"]["ratio_token_std"] > 0
    assert "| bf16-weights | generate |" in result.stdout and saved["markdown"] in result.stdout
    assert saved["settings"]["response_length"] == 12 and saved["settings"]["temperature"] == 0.7


def write_run(root, name, args, clipfracs):
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps(args))
    diag = {"diag/ratio_token_std": 0.0, "diag/ratio_token_min": 1.0, "diag/ratio_token_max": 1.0,
            "diag/clipfrac_token": 0.0, "diag/clipfrac_seq": 0.0}
    with open(run_dir / "metrics.jsonl", "w") as f:
        for update, clipfrac in enumerate(clipfracs, 1):
            f.write(json.dumps({"update": update, "objective/scores": update, "objective/rlhf_reward": update,
                                "objective/kl": 0.1 * update, "policy/clipfrac_avg": clipfrac,
                                "time/update": 1.0, **diag}) + "\n")
    return str(run_dir)


def test_compare_runs_groups_seeds_and_labels_rows_by_what_differs(tmp_path):
    base = {"exp_name": "rloo", "dtype": "bf16", "output_dir": "x", "num_updates": 4}
    runs = [write_run(tmp_path, "a1", {**base, "seed": 1, "old_logprobs": "generate"}, [0.1, 0.3, 0.1, 0.3]),
            write_run(tmp_path, "a2", {**base, "seed": 2, "old_logprobs": "generate"}, [0.3, 0.5, 0.3, 0.5]),
            write_run(tmp_path, "b1", {**base, "seed": 1, "old_logprobs": "forward", "num_updates": 8}, [0.0] * 4)]
    lines = compare_runs.table([compare_runs.summarise_run(r, gold=False, gold_prompts=0) for r in runs]).splitlines()
    assert len(lines) == 4  # header, rule, one row per configuration
    header = [c.strip() for c in lines[0].split("|")]
    generate = [c.strip() for c in lines[2].split("|")]
    forward = [c.strip() for c in lines[3].split("|")]
    assert generate[1] == "rloo old_logprobs=generate" and generate[2] == "2"  # num_updates is derived: no label
    assert forward[1] == "rloo old_logprobs=forward" and forward[2] == "1"
    # Mean over updates per run (0.2 and 0.4), then mean ± standard deviation over the two seeds.
    assert generate[header.index("clipfrac (mean)")] == "0.3 ± 0.14"
    assert generate[header.index("rlhf_reward, last 10%")] == "4 ± 0"


def test_ratio_study_dry_run_lists_every_run_and_the_summary():
    env = {**os.environ, "DRY_RUN": "1", "SEEDS": "1 2", "RUNS": "/nonexistent", "MODEL": "tiny", "DTYPE": "bf16",
           "EPISODES": "6400", "RESULTS": "/nonexistent"}
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmark", "ratio_study.sh")], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    runs = [c for c in commands if " rloo.py " in c or " ppo.py " in c]
    assert sum(c.startswith("+ rm -rf /nonexistent/") for c in commands) == len(runs)  # no half-finished run kept
    assert len(runs) == 2 * 3 * 2  # seeds x (rloo, rloo 2x2, ppo) x (generate, forward)
    assert sum("--num-mini-batches 2" in c for c in runs) == 4 and sum("--old-logprobs forward" in c for c in runs) == 6
    assert "ratio_diagnostics.py" in commands[0] and "compare_runs.py" in commands[-1] and "--gold" in commands[-1]


def test_compare_runs_labels_script_specific_arguments_that_vary(tmp_path):
    ppo = {"exp_name": "ppo", "output_dir": "x", "seed": 1, "gamma": 1.0}
    runs = [write_run(tmp_path, "p1", {**ppo, "vf_coef": 0.1}, [0.0]), write_run(tmp_path, "p2", {**ppo, "vf_coef": 0.2}, [0.0]),
            write_run(tmp_path, "r1", {"exp_name": "rloo", "output_dir": "x", "seed": 1, "rloo_k": 4}, [0.0])]
    lines = compare_runs.table([compare_runs.summarise_run(r, gold=False, gold_prompts=0) for r in runs]).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["ppo vf_coef=0.1", "ppo vf_coef=0.2", "rloo"]
