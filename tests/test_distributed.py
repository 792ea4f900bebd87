"""Data parallel on 2 CPU processes (gloo), the way `accelerate launch` runs rloo.py and ppo.py on many GPUs:
the run finishes, every process holds the same policy after every update, metrics and episode counts are
global, leave-one-out groups stay on one process, and 2 processes with B completions each compute the same
update as 1 process with 2B (tests/distributed_probe.py makes sampling independent of the batch layout)."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from conftest import ROOT, read_metrics
from transformers import AutoModelForCausalLM

PROBE = os.path.join(ROOT, "tests", "distributed_probe.py")


def run(script, tmp_path, name, processes, *flags):
    """The probe on `processes` processes (plain python for 1, as a user runs it); returns (metrics, records)."""
    output_dir, record_dir = tmp_path / name, tmp_path / f"{name}_records"
    launcher = [sys.executable]
    if processes > 1:  # --standalone: a rendezvous on localhost, on a port of its own choosing
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    log = tmp_path / f"{name}.log"
    with open(log, "w") as out:
        launched = subprocess.Popen([*launcher, PROBE, script, str(record_dir), *flags, "--output-dir", str(output_dir),
                                     "--num-sample-generations", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            launched.wait(timeout=300)
        except subprocess.TimeoutExpired:
            launched.terminate()  # torchrun stops its workers (in sessions of their own) when it is terminated
            launched.wait(timeout=60)
            pytest.fail(f"{name} timed out:\n{log.read_text()[-3000:]}")
    assert launched.returncode == 0, log.read_text()[-3000:]
    records = [json.load(open(record_dir / f"rank{r}.json")) for r in range(processes)]
    for record in records:
        record["prompts"] = [tuple(prompt) for prompt in record["prompts"]]
    return read_metrics(output_dir), records


def assert_same_update(one, two, names):
    for name in names:
        assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_two_processes_compute_the_update_of_one_process_with_twice_the_batch(tmp_path, script):
    common = ["--total-episodes", "64", "--gradient-accumulation-steps", "2", "--local-rollout-forward-batch-size", "8",
              *(["--rloo-k", "2"] if script == "rloo" else [])]
    one_metrics, (one,) = run(script, tmp_path, "one", 1, *common, "--per-device-train-batch-size", "16")
    two_metrics, (rank0, rank1) = run(script, tmp_path, "two", 2, *common, "--per-device-train-batch-size", "8")

    # Global sizes: 32 completions per update either way, 2 updates, logged once by the main process.
    assert [m["episode"] for m in one_metrics] == [m["episode"] for m in two_metrics] == [32, 64]
    # Every process holds the same policy after every optimizer step.
    assert len(rank0["checksums"]) == len(one["checksums"]) > 0 and rank0["checksums"] == rank1["checksums"]
    assert rank0["grad_norms"] == rank1["grad_norms"]
    # Together the processes sampled exactly the completions of the single process: the rollout metrics, taken
    # over all processes, are the same.
    assert_same_update(one_metrics[0], two_metrics[0], ["objective/scores", "objective/rlhf_reward", "objective/kl",
                                                         "objective/entropy", "val/num_eos_tokens"])
    if script == "rloo":
        # RLOO's loss is a plain mean over completions, so the gradient averaged over processes is the gradient of
        # the whole batch. (PPO's is a mean over each micro-batch's tokens and its advantages are whitened over
        # each process's completions: with other micro-batches its gradient legitimately differs.)
        assert_same_update(one_metrics[0], two_metrics[0], ["loss/policy_avg"])
        assert rank0["grad_norms"][0] == pytest.approx(one["grad_norms"][0], rel=1e-4)
    per_process = len(rank0["prompts"]) // 2  # completions per update on each process
    first_update = Counter(rank0["prompts"][:per_process]) + Counter(rank1["prompts"][:per_process])
    assert first_update == Counter(one["prompts"][: 2 * per_process])
    assert not set(rank0["prompts"][:per_process]) & set(rank1["prompts"][:per_process])  # each its own prompts
    if script == "rloo":  # the k = 2 completions of a prompt are on one process: its leave-one-out group is local
        assert set(Counter(rank0["prompts"][:per_process]).values()) == {2}
    AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # saved once, loadable
