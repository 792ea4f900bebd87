"""benchmark/: the run summary's arithmetic, the win-rate interval, and the shell entries (dry runs, a smoke run)."""

import importlib
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, assert_same_run, run_script

import tiny_world
from benchmark import compare_runs


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
                                "time/update": 1.0, "memory/peak_gb": 0.5, **diag}) + "\n")
    return str(run_dir)


def rows_of(runs, columns=()):
    """The table's data rows as lists of stripped cells (label first), and its header the same way."""
    lines = compare_runs.table([compare_runs.summarise_run(r, gold=False, gold_prompts=0) for r in runs],
                               columns).splitlines()
    split = lambda line: [c.strip() for c in line.split("|")[1:-1]]  # noqa: E731
    return split(lines[0]), [split(line) for line in lines[2:]]


def test_compare_runs_groups_seeds_and_labels_rows_by_what_differs(tmp_path):
    base = {"exp_name": "rloo", "dtype": "bf16", "output_dir": "x", "num_updates": 4}
    runs = [write_run(tmp_path, "a1", {**base, "seed": 1, "old_logprobs": "generate"}, [0.1, 0.3, 0.1, 0.3]),
            write_run(tmp_path, "a2", {**base, "seed": 2, "old_logprobs": "generate"}, [0.3, 0.5, 0.3, 0.5]),
            write_run(tmp_path, "b1", {**base, "seed": 1, "old_logprobs": "forward", "num_updates": 8}, [0.0] * 4)]
    header, (generate, forward) = rows_of(runs)
    assert generate[:2] == ["rloo old_logprobs=generate", "2"]  # num_updates is derived: never a label
    assert forward[:2] == ["rloo old_logprobs=forward", "1"]
    # Mean over updates per run (0.2 and 0.4), then mean ± standard deviation over the two seeds.
    assert generate[header.index("clipfrac (mean)")] == "0.3 ± 0.14"
    assert generate[header.index("rlhf_reward, last 10%")] == "4 ± 0"
    assert generate[header.index("training minutes")] == f"{4 / 60:.4g} ± 0"


def test_compare_runs_labels_script_specific_arguments_that_vary_and_selects_columns(tmp_path):
    ppo = {"exp_name": "ppo", "output_dir": "x", "seed": 1, "gamma": 1.0}
    runs = [write_run(tmp_path, "p1", {**ppo, "vf_coef": 0.1}, [0.0]), write_run(tmp_path, "p2", {**ppo, "vf_coef": 0.2}, [0.0]),
            write_run(tmp_path, "r1", {"exp_name": "rloo", "output_dir": "x", "seed": 1, "rloo_k": 4}, [0.0])]
    header, rows = rows_of(runs, columns=("updates", "peak memory (GB)"))
    assert [row[0] for row in rows] == ["ppo vf_coef=0.1", "ppo vf_coef=0.2", "rloo"]
    assert header == ["run", "seeds", "updates", "peak memory (GB)"] and rows[0][2:] == ["1", "0.5"]
    summaries = [compare_runs.summarise_run(r, gold=False, gold_prompts=0) for r in runs]
    labels = [label for label, _, _ in compare_runs.labelled_rows(summaries, label_args=("gamma",))]
    assert labels == ["ppo", "ppo", "rloo"]  # vf_coef was not asked for: two rows, one label
    compare_runs.plot(summaries, "clipfrac (mean)", str(tmp_path / "plot.png"), label_args=("vf_coef",))
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_win_rate_interval_arithmetic():
    # Verdicts 1, 0, 1, 0.5: rate 0.625, sample std sqrt(0.6875 / 3), half-width 1.96 * std / 2.
    rate, half = tiny_world.win_rate([1.0, 0.0, 1.0, 0.5])
    assert rate == pytest.approx(0.625) and half == pytest.approx(1.96 * (0.6875 / 3) ** 0.5 / 2)
    assert tiny_world.win_rate([1.0] * 10) == (1.0, 0.0)
    # Over seeds: a t-interval (3 seeds: t = 4.303) around the mean of the seeds' win rates.
    seeds = [{"gold win rate": rate, "gold win rate 95% CI": 0.05} for rate in (0.4, 0.5, 0.6)]
    assert compare_runs.cell("gold win rate 95% CI", seeds) == "[0.252, 0.748]"
    assert compare_runs.cell("gold win rate 95% CI", seeds[:1]) == "[0.350, 0.450]"  # one run: its own interval


def dry_run_result(script, **env):
    env = {**os.environ, "DRY_RUN": "1", "RUNS": "/nonexistent", "RESULTS": "/nonexistent", "MODEL": "tiny",
           "DTYPE": "bf16", "EPISODES": "6400", **env}
    return subprocess.run(["bash", os.path.join(ROOT, "benchmark", script)], capture_output=True, text=True, env=env)


def dry_run(script, **env):
    result = dry_run_result(script, **env)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    runs = [c for c in commands if " rloo_full.py " in c or " ppo_full.py " in c]
    assert not [c for c in commands if c.startswith("+ rm ")]  # a run cut short is resumed, never thrown away
    return commands, runs


@pytest.mark.slow
def test_ratio_study_dry_run_lists_every_run_and_the_summary():
    commands, runs = dry_run("ratio_study.sh", SEEDS="1 2")
    assert len(runs) == 2 * 3 * 2  # seeds x (rloo, rloo 2x2, ppo) x (generate, forward)
    assert sum("--num-mini-batches 2" in c for c in runs) == 4 and sum("--old-logprobs forward" in c for c in runs) == 6
    assert "ratio_diagnostics.py" in commands[0] and "compare_runs.py" in commands[-1] and "--gold" in commands[-1]


@pytest.mark.slow
def test_tiny_benchmark_dry_run_lists_every_run_and_the_summary():
    commands, runs = dry_run("tiny.sh", SEEDS="1 2 3")
    assert len(runs) == 3 * 3  # seeds x (rloo k=2, rloo k=4, ppo)
    assert sum("--rloo-k 2" in c for c in runs) == 3 and sum(" ppo_full.py " in c for c in runs) == 3
    assert "--sft-baseline" in commands[-1] and "--gold" in commands[-1]


@pytest.mark.slow
def test_overoptimization_dry_run_lists_the_proxy_runs_the_oracle_and_the_measurement():
    commands, runs = dry_run("overoptimization.sh", RLOO_KL="0 0.2", PPO_KL="0.05", UPDATES="40", EVERY="10")
    assert len(runs) == 2 + 1 + 1  # RLOO at each KL coefficient, the oracle, PPO
    assert sum("--reward-fn tiny_world:gold_reward --reward-model-path none" in c for c in runs) == 1
    assert all("--total-episodes 2560 --save-every 10 --keep-checkpoints 1000" in c for c in runs)
    assert "overoptimization.py" in commands[-1] and commands[-1].count("/nonexistent/") == len(runs) + 1


@pytest.mark.slow
def test_mismatch_study_dry_run_crosses_every_source_with_every_correction_and_reseeds_the_close_rows():
    commands, runs = dry_run("mismatch_study.sh", SEEDS="1", CLOSE_SEEDS="2 3", PPO_ROWS="stale16:seq-tis",
                             CLOSE_ROWS="rloo:stale16:* ppo:*")
    assert len(runs) == 7 * 4 + 4 * 2 + 1 * 3  # sources x corrections for RLOO, two more seeds on the close rows
    assert sum("--sampler-dtype bf16" in c for c in runs) == 4
    assert sum("--top-p 0.8 --top-p-logprobs renormalized" in c for c in runs) == 4
    assert sum("--top-p 0.8 --rollout-correction" in c for c in runs) == 4
    stale16_seq_tis = [c for c in runs if "--sampler-sync-every 16 --rollout-correction seq-tis" in c]
    assert sorted(c.split("--seed ")[1][0] for c in stale16_seq_tis) == ["1", "1", "2", "2", "3", "3"]
    assert "compare_runs.py" in commands[-1] and "mismatch\\ kl" in commands[-1] and "--plot" in commands[-1]


@pytest.mark.slow
def test_lora_dry_run_sweeps_the_rate_then_seeds_full_and_lora_at_the_chosen_rate():
    commands, runs = dry_run("lora.sh", SEEDS="1 2", SCRIPTS="rloo ppo", RLOO_LRS="1e-4 1e-3", PPO_LRS="1e-3 1e-2",
                             RANK="4")
    sweep = [c for c in runs if "--lora-r 4 --learning-rate 1e-" in c]
    # full fine-tuning at seed 1 beside each sweep, and again among the seeds (a real run skips it, being finished)
    assert len(sweep) == 2 * 2 and sum("--lora-r" not in c and "--seed 1 " in c for c in runs) == 2 * 2
    assert sum("--learning-rate BEST" in c and "--seed 2 " in c for c in runs) == 2  # the chosen rate, each script
    tables = [c for c in commands if "compare_runs.py" in c]
    assert len(tables) == 3 and "lora_sweep_rloo.md" in tables[0] and "lora_tiny.png" in tables[-1]


@pytest.mark.slow
def test_overoptimization_measures_every_checkpoint_from_the_sft_policy_on(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("rloo_full.py", "--output-dir", str(run_dir), "--total-episodes", "128", "--save-every", "1",
                        "--num-sample-generations", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark", "overoptimization.py"), str(run_dir),
                             "--prompts", "32", "--output", str(tmp_path / "oo")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    points = json.load(open(tmp_path / "oo.json"))
    assert [p["update"] for p in points] == [0, 1, 2]
    assert points[0]["kl"] == 0.0 and points[2]["kl"] != 0.0  # the SFT policy is its own reference
    assert (tmp_path / "oo.png").stat().st_size > 0 and "| peak |" in open(tmp_path / "oo.md").read()


@pytest.mark.slow
def test_tiny_benchmark_smoke_run_writes_the_table(tmp_path):
    env = {**os.environ, "SEEDS": "1", "EPISODES": "256", "RUNS": str(tmp_path / "runs"), "RESULTS": str(tmp_path),
           "PYTHON": sys.executable}
    env.pop("DRY_RUN", None)
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmark", "tiny.sh")], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "tiny.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["SFT", "rloo num_ppo_epochs=1 rloo_k=2",
                                                                 "rloo num_ppo_epochs=1 rloo_k=4", "ppo num_ppo_epochs=4"]
    for line in lines[2:]:
        win_rate = float(line.split("|")[3])
        assert 0.0 < win_rate < 1.0
    # A rerun resumes: every finished run is skipped.
    rerun = subprocess.run(["bash", os.path.join(ROOT, "benchmark", "tiny.sh")], capture_output=True, text=True,
                           env=env, timeout=600)
    assert rerun.returncode == 0 and rerun.stdout.count("(finished)") == 3


# The recipes' global batches, completions per update: TRL's RLOO TL;DR command (docs/source/rloo_trainer.md of TRL
# v0.11: 8 GPUs x 8 per device x 8 accumulation x 2 minibatches) and Huang et al. 2024's PPO (summarize_from_feedback_
# details, sbatches/ppo.sbatch: 8 GPUs x 16 per device x 4 accumulation, one minibatch).
GLOBAL_BATCH = {"rloo_full.py": 1024, "ppo_full.py": 512}


def path_with_nvidia_smi(tmp_path, gpus):
    """PATH with an nvidia-smi first that lists `gpus` GPUs (none: what nvidia-smi -L says on a machine without)."""
    bin_dir = tmp_path / f"bin{gpus}"
    bin_dir.mkdir()
    lines = [f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'" for i in range(gpus)] or [
        "echo 'No devices were found'", "exit 6"]
    (bin_dir / "nvidia-smi").write_text("\n".join(["#!/bin/sh", *lines]) + "\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def launched(command):
    """A printed training command as (launcher words, script, the script's arguments, number of processes)."""
    words = shlex.split(command[2:])
    at = next(i for i, word in enumerate(words) if word in GLOBAL_BATCH)
    launcher = words[:at]
    processes = int(launcher[launcher.index("--num_processes") + 1]) if "--num_processes" in launcher else 1
    return launcher, words[at], words[at + 1 :], processes


@pytest.mark.slow
@pytest.mark.parametrize("entry,runs_expected", [("tldr_rloo.sh", 2 * 2 * 2), ("tldr_ppo.sh", 2 * 2)])
def test_full_scale_dry_runs_print_commands_that_parse_with_each_scripts_own_arguments(tmp_path, entry,
                                                                                        runs_expected):
    import tyro

    from benchmark import judge

    # No GPU listed: the 8-GPU recipe. NUM_GPUS=1 wins over the 2 GPUs listed: one process, the accumulation x 8.
    for gpus_listed, num_gpus, processes in ((0, None, 8), (2, "1", 1)):
        env = {"SEEDS": "1 2", "PYTHON": sys.executable, "PATH": path_with_nvidia_smi(tmp_path, gpus_listed)}
        commands, runs = dry_run(entry, **env, **({"NUM_GPUS": num_gpus} if num_gpus else {}))
        assert len(runs) == runs_expected  # models x seeds (x k = 2, 4 for RLOO)
        models = set()
        for command in runs:
            launcher, script, script_args, n = launched(command)
            module = importlib.import_module(script.removesuffix(".py"))
            args = module.parse_args(script_args)
            args.world_size = n  # what the launcher starts
            module.check_args(args)  # sizes that divide, k >= 2, ...: what the script checks before it loads anything
            assert args.sft_model_path.startswith("cleanrl/EleutherAI_pythia-") and args.dtype == "bf16"
            models.add(args.model)
            assert n == processes
            per_update = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.num_mini_batches
            assert per_update * n == args.batch_size == GLOBAL_BATCH[script], command
            if args.model == "pythia-6.9b":  # ZeRO-3 by itself, on as many processes
                assert launcher == ["accelerate", "launch", "--config_file", "benchmark/zero3.yaml", "--num_processes",
                                    str(processes)], command
            else:  # plain data parallel, or the script alone on one GPU
                assert launcher == (["accelerate", "launch", "--num_processes", str(processes)] if processes > 1
                                    else [sys.executable]), command
        assert models == {"pythia-1b", "pythia-6.9b"}  # both by default
        for command in commands:
            words = shlex.split(command[2:])
            if words[1] == "benchmark/judge.py":
                assert tyro.cli(judge.Args, args=words[2:]).num_prompts == 1000
            elif words[1] == "benchmark/compare_runs.py":
                assert "judge win rate 95% CI" in tyro.cli(compare_runs.Args, args=words[2:]).columns
            else:
                assert command in runs, command
        assert sum("judge.py" in c for c in commands) == len(runs)


@pytest.mark.slow
def test_full_scale_dry_run_counts_the_gpus_nvidia_smi_lists_and_refuses_a_count_that_does_not_divide(tmp_path):
    path = path_with_nvidia_smi(tmp_path, 2)
    _, runs = dry_run("tldr_rloo.sh", PATH=path, PYTHON=sys.executable, MODELS="pythia-1b")
    assert [launched(c)[0] for c in runs] == [["accelerate", "launch", "--num_processes", "2"]] * 2
    assert all("--gradient-accumulation-steps 16 " in c for c in runs)  # 1024 / (16 per device x 2 minibatches x 2)
    # 3 processes: 1024 / (16 x 2 x 3) is no whole number. Refused in one line, before any command is printed.
    for env in ({"NUM_GPUS": "3"}, {"NUM_GPUS": "0"}, {"NUM_GPUS": "two"},
                {"NUM_GPUS": "2", "LAUNCHER": "accelerate launch --num_processes 4"}):
        result = dry_run_result("tldr_rloo.sh", PATH=path, PYTHON=sys.executable, **env)
        assert result.returncode != 0 and "+ " not in result.stdout, env
        assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr


def test_compare_runs_reads_the_llm_judges_result(tmp_path):
    runs = [write_run(tmp_path, f"r{seed}", {"exp_name": "rloo", "output_dir": "x", "seed": seed}, [0.0])
            for seed in (1, 2)]
    for run, rate in zip(runs, (0.40, 0.50)):
        os.makedirs(os.path.join(run, "judge_gpt-4o"))
        with open(os.path.join(run, "judge_gpt-4o", "result.json"), "w") as f:
            json.dump({"win_rate": rate, "ci95": [rate - 0.03, rate + 0.03], "mean_length": 20.0, "failed": 1}, f)
    header, (row,) = rows_of(runs, columns=("judge win rate", "judge win rate 95% CI", "judge failures"))
    # Two seeds: t = 12.706 times the standard error of the mean of 0.40 and 0.50 (0.635): clipped to [0, 1].
    assert row[2:] == ["0.45 ± 0.071", "[0.000, 1.000]", "1 ± 0"]
    # A second judge's result in the same run: which to show must be chosen.
    os.makedirs(os.path.join(runs[0], "judge_other"))
    with open(os.path.join(runs[0], "judge_other", "result.json"), "w") as f:
        json.dump({"win_rate": 0.9, "ci95": [0.85, 0.95], "mean_length": 20.0, "failed": 0}, f)
    with pytest.raises(SystemExit, match="several judges"):
        compare_runs.summarise_run(runs[0], gold=False, gold_prompts=0)
    assert compare_runs.summarise_run(runs[0], False, 0, judge_model="other")["figures"]["judge win rate"] == 0.9


@pytest.mark.slow
def test_memory_runtime_measures_both_scripts_full_and_lora_and_draws_the_chart(tmp_path):
    from benchmark import memory_runtime

    prefix = tmp_path / "mr"
    memory_runtime.main(memory_runtime.Args(sizes=("14m",), updates=2, cache_dir=str(tmp_path / "models"),
                                            output=str(prefix), lora_r=(0, 4)))
    rows = {(r["script"], r["lora_r"]): r for r in json.load(open(f"{prefix}.json"))["rows"]}
    full_rloo, full_ppo, lora_rloo, lora_ppo = (rows[key] for key in [("rloo_full.py", 0), ("ppo_full.py", 0), ("rloo_full.py", 4),
                                                                        ("ppo_full.py", 4)])
    assert full_rloo["models"] == 3 and full_ppo["models"] == 4
    assert full_rloo["held_m"] == pytest.approx(35.7, abs=0.1) and full_ppo["held_m"] == pytest.approx(43.3, abs=0.1)
    # PPO's value model and its AdamW state (7.6M parameters, ~0.12 GB in fp32) show in the peak memory.
    assert full_ppo["peak_gb"] > full_rloo["peak_gb"]
    # LoRA: no reference copy, and rank 4 on 6 layers of width 128 trains 4 x 16 x 128 x 6 = 49152 weights
    assert lora_rloo["models"] == 2  # the policy (and its adapters) and the reward model
    assert lora_rloo["held_m"] == pytest.approx(full_rloo["held_m"] - full_rloo["trained_m"] + 0.05, abs=0.02)
    value_model = full_ppo["trained_m"] - full_rloo["trained_m"]  # PPO's value model trains in full with LoRA too
    assert lora_rloo["trained_m"] == 0.05
    assert lora_ppo["trained_m"] == pytest.approx(0.05 + value_model, abs=0.01)
    assert lora_rloo["model_state_gb"] < full_rloo["model_state_gb"] / 2
    assert all(r["s_per_update"] > 0 for r in rows.values())
    table = open(f"{prefix}.md").read()
    assert "| pythia-14m | PPO |" in table and "| pythia-14m | RLOO LoRA r=4 |" in table
    assert open(f"{prefix}.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_speed_table_has_our_rows_and_the_phases_without_trl(tmp_path, monkeypatch):
    from benchmark import speed

    memory_runtime = speed.memory_runtime  # the module speed.py uses
    monkeypatch.setattr(memory_runtime, "build_models",
                        lambda size, root, build=memory_runtime.build_models: build(size, str(tmp_path / "models")))
    prefix = tmp_path / "speed"
    speed.main(speed.Args(size="14m", epochs=(1,), updates=2, output=str(prefix)))
    table = open(f"{prefix}.md").read()
    assert "| RLOO | 1 |" in table and "| PPO | 1 |" in table and "not run" in table  # no TRL venv given
    rows = json.load(open(f"{prefix}.json"))["rows"]
    for row in rows:  # every phase measured (at 1 epoch the training forward is the rollout's, kept), little other
        assert all(row["ours"][f"{phase}_s"] > 0 for phase in memory_runtime.PHASES[:-1] if phase != "training_forward")
        assert row["ours"]["training_forward_s"] == 0
        assert row["ours"]["other_s"] < 0.25 * row["ours"]["s_per_update"]


def lib_train(run_dir, *command):
    """The command line of benchmark/lib.sh's `train RUN_DIR COMMAND...`, as a benchmark script calls it."""
    return ["bash", "-c", f'source {shlex.quote(ROOT)}/benchmark/lib.sh; train "$@"', "train", str(run_dir), *command]


@pytest.mark.slow
def test_a_finished_run_is_skipped_and_one_made_by_another_command_is_refused(tmp_path):
    def train(name, *command):
        return subprocess.run(lib_train(tmp_path / name, *command), capture_output=True, text=True)

    makes_its_output_dir = [sys.executable, "-c", "import os, sys; os.makedirs(sys.argv[-1])"]
    first = train("run", *makes_its_output_dir, "--flag", "a b")
    assert first.returncode == 0 and (tmp_path / "run" / "FINISHED").exists(), first.stderr
    again = train("run", *makes_its_output_dir, "--flag", "a b")
    assert again.returncode == 0 and "skip" in again.stdout and "+ " not in again.stdout
    other = train("run", *makes_its_output_dir, "--flag", "c")
    assert other.returncode == 1 and "was made by another command" in other.stderr
    # Cut short, the run keeps the record of its command: only that command may take it on.
    cut_short = train("cut", sys.executable, "-c", "import sys; sys.exit(143)")
    assert cut_short.returncode == 143 and not (tmp_path / "cut" / "FINISHED").exists()
    assert "was made by another command" in train("cut", sys.executable, "-c", "pass").stderr
    (tmp_path / "by_hand").mkdir()  # no record: which command made it is unknown
    assert "without" in train("by_hand", *makes_its_output_dir).stderr and not (tmp_path / "by_hand.COMMAND").exists()


@pytest.mark.slow
def test_a_run_cut_short_resumes_when_the_benchmark_is_run_again(tmp_path):
    command = [sys.executable, "rloo_full.py", "--total-episodes", "192", "--num-sample-generations", "0"]  # 3 updates

    def train(name):
        return subprocess.run(lib_train(tmp_path / name, *command), cwd=ROOT, capture_output=True, text=True,
                              timeout=600)

    reference = train("reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    # Preempted: SIGTERM to the benchmark and its run, which finishes the update under way, saves it and exits.
    benchmark = subprocess.Popen(lib_train(tmp_path / "run", *command), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    assert any(line.startswith("update 1/") for line in benchmark.stdout)
    os.killpg(benchmark.pid, signal.SIGTERM)
    output = benchmark.communicate(timeout=300)[0]  # to the end of the output: the run has exited too
    assert "stopped by a signal after update" in output and not (tmp_path / "run" / "FINISHED").exists(), output
    rerun = train("run")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "--resume" in rerun.stdout.splitlines()[0] and "resuming" in rerun.stdout
    assert (tmp_path / "run" / "FINISHED").exists() and not (tmp_path / "run.COMMAND").exists()
    assert_same_run(tmp_path / "reference", tmp_path / "run")  # every update once, bitwise the same weights
