"""The bf16 ratio study: the diagnostics measure what they claim, and the `forward` old-logprob source is exact."""

import importlib
import json

import pytest
import torch
from conftest import read_metrics, run_script

from benchmark import ratio_diagnostics


def test_generate_logprobs_match_the_training_forward_in_fp32_on_the_tiny_world():
    settings, tokenizer, policy, queries = ratio_diagnostics.load(ratio_diagnostics.Args(num_sequences=16))
    rows = {r["comparison"]: r for r in ratio_diagnostics.measure(policy, tokenizer, queries, "fp32", settings, 0.2, 1)}
    for comparison in ("generate", "(a) one full forward vs KV-cache decoding, same batch"):
        row = rows[comparison]
        assert 1 - 1e-4 < row["ratio_token_min"] <= row["ratio_token_max"] < 1 + 1e-4, row
    # In fp32 the "low precision" is fp32 itself: both (c) comparisons are of identical computations.
    for comparison in [c[0] for c in ratio_diagnostics.COMPARISONS if c[0].startswith("(c)")]:
        assert rows[comparison]["ratio_token_min"] == rows[comparison]["ratio_token_max"] == 1.0, comparison


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_first_minibatch_ratio_is_one_even_when_the_rollout_forward_disagrees(monkeypatch, tmp_path, script):
    # On this CPU a separate no-grad forward already matches the training forward bit for bit; GPU kernels can
    # depend on the batch shape. Make the rollout pass disagree, as such kernels would: the first minibatch must
    # still see a ratio of exactly 1 (its old logprobs are its own forward), and only later minibatches may not.
    module = importlib.import_module(script)
    exact = module.policy_forward
    noise = torch.Generator().manual_seed(0)

    def rollout_disagrees(*args, **kwargs):
        output = exact(*args, **kwargs)
        if torch.is_grad_enabled():
            return output
        return output._replace(logprobs=output.logprobs + 1e-3 * torch.randn(output.logprobs.shape, generator=noise))

    monkeypatch.setattr(module, "policy_forward", rollout_disagrees)
    output_dir = tmp_path / "run"
    # Learning rate 0: the policy never moves, so any ratio off 1 is the rollout pass's disagreement.
    module.main(module.parse_args(["--total-episodes", "256", "--num-mini-batches", "2", "--num-ppo-epochs", "1",
                                   "--learning-rate", "0", "--output-dir", str(output_dir)]))
    for m in read_metrics(output_dir):
        assert m["diag/ratio_token_min"] == m["diag/ratio_token_max"] == 1.0 and m["diag/clipfrac_seq"] == 0.0
        assert m["val/ratio_var"] > 0  # the second minibatch's old logprobs are the (disagreeing) rollout's


@pytest.mark.slow
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
    # Two passes over other batches (shuffled training minibatches vs rollout chunks): equal only up to how the CPU's
    # kernels round each batch shape (exactly on some CPUs, std 1e-7 on an AVX512 one), hence a tolerance.
    forward = rows["fp32", "forward (a separate pass)"]
    assert forward["ratio_token_std"] < 1e-5, forward
    assert 1 - 1e-4 < forward["ratio_token_min"] <= forward["ratio_token_max"] < 1 + 1e-4, forward
    assert rows["bf16-weights", "(d) the policy in fp32 vs in the precision"]["ratio_token_std"] > 0
    assert "| bf16-weights | generate |" in result.stdout and saved["markdown"] in result.stdout
    assert saved["settings"]["response_length"] == 12 and saved["settings"]["temperature"] == 0.7
