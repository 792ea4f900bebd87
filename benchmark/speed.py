"""Seconds per update and peak memory of rloo.py and ppo.py against TRL 0.21's RLOOTrainer and PPOTrainer at equal
settings, and where each update's time goes.

Every run is its own process on a random Pythia-shaped policy and reward model (benchmark/memory_runtime.py builds
them; vocabulary 50304), over the tiny world's prompts, in fp32: per update `--batch-size` completions (RLOO:
batch / k prompts x k) of exactly `--response-length` tokens (no early stop), one minibatch, no accumulation.
TRL runs from its own venv (`--trl-python`, see benchmark/trl_baseline.py); without it only our rows are made.

    python benchmark/speed.py --trl-python /work/trl021-venv/bin/python     # the committed table
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_runtime  # noqa: E402 (models, the measurement of our scripts, the phases)

ROOT = memory_runtime.ROOT


@dataclass
class Args:
    size: str = "70m"
    """Pythia shape of the policy and reward model"""
    epochs: tuple[int, ...] = (1, 4)
    """PPO epochs per update to compare at"""
    num_mini_batches: int = 1
    """optimizer steps per epoch (the presets' structure: 2 for RLOO; PPO's presets take 1)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (the presets' structure: 2)"""
    updates: int = 6
    """updates per run, at least 2; the first is left out of the time (warm-up)"""
    batch_size: int = 8
    """completions per update"""
    rloo_k: int = 2
    """RLOO's completions per prompt"""
    response_length: int = 32
    """tokens per completion"""
    trl_python: str = ""
    """python of a venv with trl==0.21.0 (empty: our scripts only)"""
    output: str = ""
    """results prefix: .md and .json are added (default: benchmark/results/speed_{device})"""


def measure_trl(trl_python: str, trainer: str, paths: dict, dataset: str, settings: memory_runtime.Args,
                scratch: str) -> dict:
    """TRL at exactly the settings memory_runtime.measure gives our scripts."""
    output = os.path.join(scratch, f"trl-{trainer}-{settings.num_ppo_epochs}-{settings.dtype}.json")
    command = [trl_python, os.path.join(ROOT, "benchmark", "trl_baseline.py"), "--trainer", trainer,
               "--sft-model-path", paths["sft_model_path"], "--reward-model-path", paths["reward_model_path"],
               "--dataset-name", dataset, "--updates", str(settings.updates), "--batch-size", str(settings.batch_size),
               "--rloo-k", str(settings.rloo_k), "--response-length", str(settings.response_length),
               "--num-ppo-epochs", str(settings.num_ppo_epochs), "--learning-rate", str(settings.learning_rate),
               "--num-mini-batches", str(settings.num_mini_batches),
               "--gradient-accumulation-steps", str(settings.gradient_accumulation_steps),
               "--max-prompt-length", "64", "--dtype", settings.dtype, "--output-json", output]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"failed": lines[-1] if lines else f"exit code {result.returncode}"}
    with open(output) as f:
        return json.load(f)


def main(args: Args) -> None:
    import torch

    import tiny_world

    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = tiny_world.ensure_world()
    paths = memory_runtime.build_models(args.size, os.path.join(os.path.dirname(tiny_world.cache_dir()),
                                                                "pythia-shapes"))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for epochs in args.epochs:
            settings = memory_runtime.Args(sizes=(args.size,), updates=args.updates, batch_size=args.batch_size,
                                           rloo_k=args.rloo_k, response_length=args.response_length,
                                           num_ppo_epochs=epochs, num_mini_batches=args.num_mini_batches,
                                           gradient_accumulation_steps=args.gradient_accumulation_steps)
            for name in ("rloo", "ppo"):
                ours = memory_runtime.measure(f"{name}_full.py", paths, world["dataset_name"], settings,
                                              os.path.join(scratch, f"{name}-{epochs}"))
                trl = (measure_trl(args.trl_python, name, paths, world["dataset_name"], settings, scratch)
                       if args.trl_python else {})
                rows.append({"algorithm": name, "epochs": epochs, "ours": ours, "trl": trl})
                print(f"{name}, {epochs} epoch(s): ours {ours.get('s_per_update', ours.get('failed'))}, "
                      f"TRL {trl.get('s_per_update', trl.get('failed', 'not run'))}", flush=True)

    lines = [f"pythia-{args.size} shape (vocabulary 50304) as policy and reward model, {args.batch_size} completions x "
             f"{args.response_length} tokens per update in {args.num_mini_batches} minibatch(es) x "
             f"{args.gradient_accumulation_steps} micro-batch(es), RLOO k={args.rloo_k}, fp32, {device}; median seconds "
             "per "
             f"update over updates 2..{args.updates}; peak memory: "
             + ("CUDA max allocated" if device == "cuda" else "the process's peak RSS") + ".", "",
             "| algorithm | epochs | ours s/update | TRL 0.21 s/update | TRL / ours time | ours peak GB | "
             "TRL peak GB | TRL / ours memory | ours: outside model calls |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ours, trl = row["ours"], row["trl"]
        if "failed" in ours:
            lines.append(f"| {row['algorithm'].upper()} | {row['epochs']} | failed: {ours['failed'][:60]} |" + " |" * 6)
            continue
        other = f"{ours['other_s'] / ours['s_per_update']:.1%}"
        if "s_per_update" in trl:
            lines.append(f"| {row['algorithm'].upper()} | {row['epochs']} | {ours['s_per_update']:.2f} | "
                         f"{trl['s_per_update']:.2f} | {trl['s_per_update'] / ours['s_per_update']:.2f}x | "
                         f"{ours['peak_gb']:.2f} | {trl['peak_gb']:.2f} | {trl['peak_gb'] / ours['peak_gb']:.2f}x | "
                         f"{other} |")
        else:
            lines.append(f"| {row['algorithm'].upper()} | {row['epochs']} | {ours['s_per_update']:.2f} | "
                         f"{trl.get('failed', 'not run')[:60]} | | {ours['peak_gb']:.2f} | | | {other} |")
    lines += ["", "Where our update's time goes (median seconds):", "",
              "| algorithm | epochs | " + " | ".join(memory_runtime.PHASES) + " |",
              "|---|---|" + "---|" * len(memory_runtime.PHASES)]
    lines += [f"| {row['algorithm'].upper()} | {row['epochs']} | "
              + " | ".join(f"{row['ours'][f'{phase}_s']:.3f}" for phase in memory_runtime.PHASES) + " |"
              for row in rows if "failed" not in row["ours"]]
    table = "\n".join(lines)
    print(table)
    prefix = args.output or os.path.join(ROOT, "benchmark", "results", f"speed_{device}")
    memory_runtime.write_results(prefix, "benchmark/speed.py", table, {"args": asdict(args), "device": device,
                                                                      "rows": rows})
    print(f"wrote {prefix}.md and .json")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
