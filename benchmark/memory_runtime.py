"""Peak memory and seconds per update of rloo.py vs ppo.py at equal settings, over Pythia model shapes.

Each shape is a randomly initialised model with Pythia's architecture and vocabulary (50304 rows). It serves as
policy, reference, reward model and PPO's value model, over the tiny world's prompts: the cost of an update
depends on the shapes, not on what the weights have learned. Each script runs as its own process, so that its
peak memory (CUDA's max allocated on a GPU, the process's peak RSS on a CPU, as the scripts log it) is its own.
Both scripts get the same batch, response length, epochs and minibatches; RLOO's batch is B/k prompts x k.
With --lora-r 0 16, each script runs with full fine-tuning and with LoRA at rank 16. Beside the measured peak, the
table gives the parameters held and trained (as the scripts count them) and the model state they make by
arithmetic: 4 bytes per fp32 weight held, and 12 more per trained one (its gradient and AdamW's two moments).
Writes a markdown table, JSON and a bar chart (PNG) like the source document's figure.

    python benchmark/memory_runtime.py                                  # 14m, 70m, 160m shapes, CPU
    python benchmark/memory_runtime.py --lora-r 0 16                    # full fine-tuning and LoRA
    python benchmark/memory_runtime.py --sizes 1b 2.8b --updates 5      # on a GPU
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from statistics import median
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the full scripts' time/* per update
PHASES = ("generation", "rollout_forward", "training_forward", "backward", "optimizer", "other")

# Pythia's shapes (Biderman et al. 2023): hidden size, layers, attention heads.
SHAPES = {"14m": (128, 6, 4), "70m": (512, 6, 8), "160m": (768, 12, 12), "410m": (1024, 24, 16),
          "1b": (2048, 16, 8), "1.4b": (2048, 24, 16), "2.8b": (2560, 32, 32), "6.9b": (4096, 32, 32)}


@dataclass
class Args:
    sizes: tuple[Literal["14m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b"], ...] = ("14m", "70m", "160m")
    """Pythia shapes to measure"""
    updates: int = 4
    """updates per run, at least 2; the first is left out of the time (warm-up)"""
    batch_size: int = 8
    """completions per update for both scripts (RLOO: batch_size / rloo_k prompts)"""
    rloo_k: int = 2
    """RLOO's completions per prompt"""
    response_length: int = 32
    """tokens per completion (no early stop: --stop-token None, so both scripts do the same work)"""
    num_ppo_epochs: int = 1
    """optimisation epochs per update, the same for both"""
    num_mini_batches: int = 1
    """optimizer steps per epoch, the same for both"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (each batch_size / (num_mini_batches x this) completions)"""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """compute precision of both scripts"""
    gradient_checkpointing: bool = False
    """run both scripts with --gradient-checkpointing"""
    lora_r: tuple[int, ...] = (0,)
    """LoRA ranks to run each script with (0: full fine-tuning)"""
    learning_rate: float = 3e-6
    """the Pythia presets' (and TRL's default); the tiny preset's 1e-4 moves a random 70m policy so far in 4 epochs
    that RLOO's sequence ratio overflows, and the run stops on the non-finite gradient"""
    cache_dir: str = ""
    """where the random models are kept (default: $TINY_WORLD_DIR/../pythia-shapes or ~/.cache/rlhf-tiny-world/...)"""
    output: str = ""
    """results prefix: .md, .json and .png are added (default: benchmark/results/memory_runtime_{device})"""


def build_models(size: str, root: str) -> dict:
    """A random policy and reward model of the given Pythia shape, saved once (atomically) under root."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    import tiny_world

    target = os.path.join(root, size)
    paths = {"sft_model_path": os.path.join(target, "sft"), "reward_model_path": os.path.join(target, "reward")}
    if os.path.isdir(target):
        return paths
    hidden, layers, heads = SHAPES[size]
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=2048, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                           pad_token_id=1)
    os.makedirs(root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{size}-", dir=root)
    torch.manual_seed(0)
    tokenizer = tiny_world.make_tokenizer()  # decodes the ids it knows; the rest of the vocabulary decodes to ""
    GPTNeoXForCausalLM(config).save_pretrained(os.path.join(staging, "sft"))
    config.num_labels = 1
    GPTNeoXForSequenceClassification(config).save_pretrained(os.path.join(staging, "reward"))
    tokenizer.save_pretrained(os.path.join(staging, "sft"))
    os.rename(staging, target)
    return paths


def measure(script: str, paths: dict, dataset: str, args: Args, output_dir: str, lora_r: int = 0) -> dict:
    rloo = script.startswith("rloo")
    flags = ["--sft-model-path", paths["sft_model_path"], "--reward-model-path", paths["reward_model_path"],
             "--dataset-name", dataset, "--output-dir", output_dir, "--dtype", args.dtype,
             "--total-episodes", str(args.updates * args.batch_size), "--per-device-train-batch-size",
             str(args.batch_size // (args.num_mini_batches * args.gradient_accumulation_steps)),
             "--gradient-accumulation-steps", str(args.gradient_accumulation_steps),
             "--num-mini-batches", str(args.num_mini_batches),
             "--local-rollout-forward-batch-size", str(args.batch_size), "--response-length",
             str(args.response_length), "--stop-token", "None", "--num-ppo-epochs", str(args.num_ppo_epochs),
             "--max-prompt-length", "64", "--learning-rate", str(args.learning_rate),
             *(["--rloo-k", str(args.rloo_k)] if rloo else []),
             *(["--gradient-checkpointing"] if args.gradient_checkpointing else []), "--lora-r", str(lora_r)]
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], capture_output=True, text=True)
    if result.returncode != 0:  # out of memory is a result too: the row says so and the benchmark goes on
        lines = result.stderr.strip().splitlines()
        return {"failed": lines[-1] if lines else f"exit code {result.returncode}"}
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    # "N models hold H M parameters; T M are trained (...)"
    held = next(line for line in result.stdout.splitlines() if "models hold" in line).split()
    held_m, trained_m = float(held[3].removesuffix("M")), float(held[5].removesuffix("M"))
    return {"s_per_update": median(m["time/update"] for m in metrics[1:]),
            **{f"{phase}_s": median(m[f"time/{phase}"] for m in metrics[1:]) for phase in PHASES},
            "peak_gb": max(m["memory/peak_gb"] for m in metrics), "models": int(held[0]), "held_m": held_m,
            "trained_m": trained_m, "model_state_gb": (4 * held_m + 12 * trained_m) / 1e3}


def write_results(prefix: str, script: str, table: str, record: dict) -> None:
    """prefix.md: the command as it was given, then the table; prefix.json: the record."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(f"`python {script} {' '.join(sys.argv[1:])}`\n\n" + table + "\n")
    with open(prefix + ".json", "w") as f:
        json.dump(record, f, indent=2)


def label(row: dict) -> str:
    name = row["script"].removesuffix(".py").removesuffix("_full").upper()  # (measured on the full scripts)
    return name + (f" LoRA r={row['lora_r']}" if row["lora_r"] else "")


def plot(rows: list, path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    series = list(dict.fromkeys(label(r) for r in rows))
    width = 0.8 / len(series)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "peak_gb", "peak memory (GB)"), (axes[1], "s_per_update", "seconds per update")):
        for i, name in enumerate(series):
            # A failed run (out of memory) has no bar.
            values = [next(r.get(key, 0.0) for r in rows if r["size"] == s and label(r) == name) for s in sizes]
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(sizes))], values, width=width,
                   label=name)
        ax.set_xticks(range(len(sizes)), [f"pythia-{s} shape" for s in sizes])
        ax.set_title(f"{title}, {device}")
        ax.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(args: Args) -> None:
    import torch

    import tiny_world

    if args.updates < 2:
        sys.exit("error: --updates must be at least 2 (the first update is warm-up)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = tiny_world.ensure_world()
    cache = args.cache_dir or os.path.join(os.path.dirname(tiny_world.cache_dir()), "pythia-shapes")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            paths = build_models(size, cache)
            for lora_r in args.lora_r:
                for script in ("rloo_full.py", "ppo_full.py"):  # (the phase timings, gradient checkpointing, LoRA)
                    row = {"size": size, "script": script, "lora_r": lora_r,
                           **measure(script, paths, world["dataset_name"], args,
                                     os.path.join(scratch, f"{size}-{script}-{lora_r}"), lora_r)}
                    rows.append(row)
                    print(f"pythia-{size} shape, {label(row)}: " + (
                        f"failed: {row['failed']}" if "failed" in row else
                        f"{row['s_per_update']:.2f} s/update, {row['peak_gb']:.2f} GB peak, {row['trained_m']:.2f}M "
                        f"of {row['held_m']:.2f}M parameters trained"), flush=True)
    memory = "CUDA max allocated" if device == "cuda" else "peak RSS of the process"
    lines = [f"{args.batch_size} completions x {args.response_length} tokens per update, {args.num_ppo_epochs} epoch(s), "
             f"{args.dtype}{', gradient checkpointing' if args.gradient_checkpointing else ''}, {device}; "
             f"RLOO k={args.rloo_k}; time: median over updates 2..{args.updates}; memory: {memory}. Model state: "
             "4 bytes per weight held + 12 per weight trained (fp32), arithmetic.",
             "", "| shape | script | s/update | " + " | ".join(f"{phase} s" for phase in PHASES) +
             " | peak GB | held M | trained M (share) | model state GB | PPO / RLOO time | PPO / RLOO memory |",
             "|---|---|---|" + "---|" * len(PHASES) + "---|---|---|---|---|---|"]
    for row in rows:
        if "failed" in row:
            lines.append(f"| pythia-{row['size']} | {label(row)} | failed: {row['failed'][:80]} |" + " |" * 11)
            continue
        rloo = next(r for r in rows
                    if (r["size"], r["lora_r"], r["script"]) == (row["size"], row["lora_r"], "rloo_full.py"))
        ratios = (f"{row['s_per_update'] / rloo['s_per_update']:.2f}x | {row['peak_gb'] / rloo['peak_gb']:.2f}x"
                  if row["script"] == "ppo_full.py" and "failed" not in rloo else " | ")
        phases = " | ".join(f"{row[f'{phase}_s']:.3f}" for phase in PHASES)
        lines.append(f"| pythia-{row['size']} | {label(row)} | {row['s_per_update']:.2f} | {phases} | "
                     f"{row['peak_gb']:.2f} | {row['held_m']:.2f} | {row['trained_m']:.2f} "
                     f"({row['trained_m'] / row['held_m']:.1%}) | {row['model_state_gb']:.3f} | {ratios} |")
    table = "\n".join(lines)
    print(table)
    prefix = args.output or os.path.join(ROOT, "benchmark", "results", f"memory_runtime_{device}")
    write_results(prefix, "benchmark/memory_runtime.py", table, {"args": asdict(args), "device": device, "rows": rows})
    plot(rows, prefix + ".png", device)
    print(f"wrote {prefix}.md, .json and .png")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
