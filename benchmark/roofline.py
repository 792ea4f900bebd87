"""Each phase of an update against this machine's limit (its roofline), for rloo_full.py / ppo_full.py and TRL 0.21.

1. The machine's peaks, measured here: GEMM FLOP/s at the model's own matrix shapes (the best of them is the compute
   ceiling), in fp32 and bf16, the memory bandwidth of streams over arrays larger than the fast caches, and one
   decode step's matmuls alone.
2. Each phase's work, counted from the model's shapes with the formulas of docs/roofline.md (FLOPs and bytes per
   operation class: matmuls, attention, elementwise, softmax), for the passes each side runs in that phase.
3. The phase's roofline: the sum over passes and classes of max(FLOPs / peak, bytes / bandwidth). The achieved
   fraction is roofline / measured seconds; both sides' phase times come from their own clocks (the full scripts'
   time/*, benchmark/trl_baseline.py's PhaseClock), medians over updates 2..N of --repeats separate runs.

    python benchmark/roofline.py --trl-python /work/trl021-venv/bin/python      # the committed table and plot
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmark/roofline.py --trl-python ... \
        --dtypes fp32 --repeats 2 --output benchmark/results/roofline_cpu_malloc_env   # glibc keeping its memory
"""

import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Literal

import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memory_runtime  # noqa: E402 (the random Pythia-shaped models, our scripts' measurement)
import speed  # noqa: E402 (TRL's measurement)

ROOT = memory_runtime.ROOT
PHASES = memory_runtime.PHASES[:-1]  # time/other has no model work to bound
# (completions per update, minibatches, micro-batches per minibatch, epochs) of each structure and algorithm: the
# benchmark's (speed.py's, 1 epoch) and the presets' (RLOO 2 x 2 at 2 epochs; PPO 1 x 2 at 4, TRL's PPO taking no
# more than one accumulating minibatch)
STRUCTURES = {"speed": {"rloo": (8, 1, 1, 1), "ppo": (8, 1, 1, 1)},
              "presets": {"rloo": (16, 2, 2, 2), "ppo": (16, 1, 2, 4)}}


@dataclass
class Args:
    size: str = "70m"
    """Pythia shape of the policy and reward model"""
    structures: tuple[Literal["speed", "presets"], ...] = ("speed", "presets")
    """the shapes of an update to measure (see STRUCTURES)"""
    dtypes: tuple[Literal["fp32", "bf16"], ...] = ("fp32", "bf16")
    """compute precisions (bf16: autocast, on this CPU's AMX / avx512_bf16 kernels)"""
    bf16_structures: tuple[Literal["speed", "presets"], ...] = ("speed",)
    """the structures also run in bf16 (slow on a CPU without bf16 kernels)"""
    algorithms: tuple[Literal["rloo", "ppo"], ...] = ("rloo", "ppo")
    """the full scripts (and TRL trainers) to measure"""
    repeats: int = 3
    """separate runs of each side per row: the figure is the median of the runs' medians, with their range"""
    updates: int = 4
    """updates per run, at least 2; the first is warm-up"""
    rloo_k: int = 2
    """RLOO's completions per prompt"""
    response_length: int = 32
    """tokens per completion (no early stop)"""
    trl_python: str = ""
    """python of a venv with trl==0.21.0 (empty: our scripts only)"""
    output: str = ""
    """results prefix: .md, .json and .png are added (default: benchmark/results/roofline_cpu)"""


def timed_median(function, repeats=15):
    function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def machine_peaks(hidden: int, layers: int, vocab: int, tokens: int, decode_rows: tuple) -> dict:
    """GEMM FLOP/s at the model's shapes per dtype (x W^T, F.linear's product, into a kept output: the kernel's
    rate, not the allocator's), the matmuls of one decode step alone, and streaming bandwidth."""
    import torch

    shapes = {"qkv": (tokens, hidden, 3 * hidden), "mlp_up": (tokens, hidden, 4 * hidden),
              "mlp_down": (tokens, 4 * hidden, hidden), "output_layer": (tokens, hidden, vocab),
              "decode_mlp_up": (8, hidden, 4 * hidden), "decode_output_layer": (8, hidden, vocab)}
    peaks = {"threads": torch.get_num_threads(), "gemm_flops": {}}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {}
        for shape, (m, k, n) in shapes.items():
            x, w, y = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.empty(m, n, dtype=dtype)
            rates[shape] = 2 * m * k * n / timed_median(lambda: torch.mm(x, w.t(), out=y))
        peaks["gemm_flops"][name] = rates
        peaks[f"{name}_peak_flops"] = max(rate for shape, rate in rates.items() if not shape.startswith("decode"))
        # One decode step's matmuls alone, F.linear over every weight matrix in turn as the model runs them: the
        # 178 MB of fp32 weights stream from memory, as in generation. The fastest a step can be with these kernels.
        weights = [torch.randn(n, k, dtype=dtype) for _ in range(layers)
                   for n, k in ((3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden))]
        weights.append(torch.randn(vocab, hidden, dtype=dtype))
        for rows in decode_rows:
            inputs = [torch.randn(rows, w.shape[1], dtype=dtype) for w in weights]
            peaks.setdefault("decode_matmul_s", {})[f"{name}_{rows}"] = timed_median(
                lambda: [torch.nn.functional.linear(x, w) for x, w in zip(inputs, weights)], repeats=9)
    # Bandwidth: the faster of an in-place add (read two arrays, write one back: 12 bytes per element, as AdamW's
    # in-place updates move them; no write-allocate read hides in it) and a read-only sum, over 512 MB arrays,
    # beyond the fast caches; and the in-place add over 16 MB arrays, which stay in them.
    for label, megabytes in (("bandwidth", 512), ("cache_bandwidth", 16)):
        a, b = torch.randn(megabytes * 2**18), torch.randn(megabytes * 2**18)
        peaks[f"{label}_add"] = 12 * a.numel() / timed_median(lambda: a.add_(b, alpha=1e-9), repeats=9)
        peaks[f"{label}_read"] = 4 * a.numel() / timed_median(lambda: a.sum(), repeats=9)
        peaks[label] = max(peaks[f"{label}_add"], peaks[f"{label}_read"])
    return peaks


def pass_work(h, layers, vocab, rows, new, cached, logit_rows, element):
    """FLOPs and bytes of one forward of a GPT-NeoX model over `new` tokens of each of `rows` sequences, after
    `cached` ones in its KV cache, its output layer at `logit_rows` positions per row (0: a reward or value model's
    scalar head). Per class: (FLOPs, bytes). docs/roofline.md gives the formulas and what they leave out."""
    tokens = rows * new
    weights = 12 * h * h * layers + (h * vocab if logit_rows else 0)
    logits = rows * logit_rows
    visible_keys = rows * (new * cached + new * (new + 1) // 2)  # causal (the minimum): query i sees cached + i keys
    return {"matmul": (2 * tokens * 12 * h * h * layers + 2 * logits * h * vocab,
                       element * (weights + tokens * 16 * h * layers + logits * (h + vocab))),
            "attention": (4 * visible_keys * h * layers, element * layers * h * rows * (4 * new + 2 * cached)),
            "elementwise": (tokens * h * (17 * layers + 4), element * tokens * h * (17 * layers + 4)),
            "softmax": (3 * logits * vocab, 4 * logits * vocab)}  # the log-softmax reads fp32 logits once


def scaled(work, factor):
    return {name: (flops * factor, nbytes * factor) for name, (flops, nbytes) in work.items()}


def phase_passes(side, algorithm, structure, h, layers, vocab, prompt, response, trained, dtype):
    """The passes each phase runs per update, on our side or TRL's: {phase: [(work, the dtype it computes in)]}."""
    batch, minibatches, micro, epochs = STRUCTURES[structure][algorithm]
    ppo, full = algorithm == "ppo", prompt + response
    # TRL's bf16 is accelerate's autocast around the prepared module's forward only. Its reference and reward model,
    # PPO's value pass in the rollout and PPO's generation (through the unwrapped policy) compute in fp32.
    outside = "fp32" if side == "trl" else dtype

    def run(rows, new, cached, logit_rows, in_dtype=dtype):
        return pass_work(h, layers, vocab, rows, new, cached, logit_rows, 2 if in_dtype == "bf16" else 4), in_dtype

    sampling = outside if ppo else dtype
    generation = [run(batch, prompt, 0, 1, sampling)]  # the prompts' pass, then one step per further token
    generation += [run(batch, 1, prompt + t, 1, sampling) for t in range(response - 1)]
    rows = batch // (minibatches * micro)
    micro_batch = [run(rows, full, 0, response)] + ([run(rows, full, 0, 0)] if ppo else [])  # policy (and value)
    # Rollout: the reference and reward model; ours also the policy (TRL takes the old logprobs from generate()'s
    # scores) and PPO the value model. With one micro-batch per update ours keeps that policy pass as the first
    # epoch's training forward, so the training forward runs one micro-batch fewer.
    rollout = [run(batch, full, 0, response, outside), run(batch, full, 0, 0, outside)]
    if side == "ours":
        rollout += [run(batch, full, 0, response)] + ([run(batch, full, 0, 0)] if ppo else [])
    elif ppo:
        rollout += [run(batch, full, 0, 0, outside)]
    micro_batches = epochs * minibatches * micro
    kept = side == "ours" and minibatches == micro == 1
    # AdamW reads the weight, gradient and two moments and writes three: 28 bytes per fp32 weight; our clipping
    # reads the gradient twice (the norm, the scaling) and writes it once: 12 more. TRL clips nothing here.
    step = ({"optimizer": (14 * trained, (40 if side == "ours" else 28) * trained)}, "fp32")
    return {"generation": generation, "rollout_forward": rollout,
            "training_forward": micro_batch * (micro_batches - kept),
            "backward": [(scaled(work, 2), d) for work, d in micro_batch] * micro_batches,  # dX and dW per matmul
            "optimizer": [step] * (epochs * minibatches)}


def roofline_seconds(passes, peaks):
    return sum(max(flops / peaks[f"{dtype}_peak_flops"], nbytes / peaks["bandwidth"])
               for work, dtype in passes for flops, nbytes in work.values())


def prompt_widths(dataset: str, tokenizer_path: str, prompts_per_batch: int, draws=2000) -> dict:
    """The left-padded prompt width of a batch (the longest of its prompts) over random batches: mean, 10th and
    90th percentiles. The bound takes the mean; the timed updates see their own batches."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompts = list(load_dataset(dataset, split="train")["prompt"])
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"] if len(ids) <= 64]
    rng = random.Random(0)
    widths = sorted(max(rng.sample(lengths, prompts_per_batch)) for _ in range(draws))
    return {"mean": statistics.mean(widths), "p10": widths[draws // 10], "p90": widths[9 * draws // 10]}


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_row(args, paths, dataset, dtype, structure, algorithm, scratch):
    """--repeats runs of each side, alternating, at one structure: each phase's median and range over the runs."""
    batch, minibatches, micro, epochs = STRUCTURES[structure][algorithm]
    settings = memory_runtime.Args(updates=args.updates, batch_size=batch, rloo_k=args.rloo_k,
                                   response_length=args.response_length, num_ppo_epochs=epochs,
                                   num_mini_batches=minibatches, gradient_accumulation_steps=micro, dtype=dtype)
    runs = {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        runs["ours"].append(memory_runtime.measure(f"{algorithm}_full.py", paths, dataset, settings,
                                                   os.path.join(scratch, f"{algorithm}-{structure}-{dtype}-{repeat}")))
        if args.trl_python:
            trl = speed.measure_trl(args.trl_python, algorithm, paths, dataset, settings, scratch)
            if "s_per_update" in trl:  # what TRL's clock did not charge to a phase (its update minus the phases)
                trl["other_s"] = trl["s_per_update"] - sum(trl[f"{phase}_s"] for phase in PHASES)
            runs["trl"].append(trl)
        print(f"{dtype} {structure} {algorithm} run {repeat + 1}: ours "
              f"{runs['ours'][-1].get('s_per_update', runs['ours'][-1].get('failed'))} s/update, TRL "
              + (f"{runs['trl'][-1].get('s_per_update', runs['trl'][-1].get('failed'))}" if args.trl_python
                 else "not run"), flush=True)
    result = {}
    for side, side_runs in runs.items():
        failed = [run["failed"] for run in side_runs if "failed" in run]
        if failed or not side_runs:
            result[side] = {"failed": failed[0]} if failed else {}
            continue
        result[side] = {key: spread([run[key] for run in side_runs])
                        for key in ("s_per_update", *(f"{phase}_s" for phase in PHASES), "other_s", "peak_gb")}
        result[side]["trained_m"] = side_runs[0].get("trained_m")
    if result["trl"] and "failed" not in result["trl"] and "failed" not in result["ours"]:
        ratios = [t["s_per_update"] / o["s_per_update"] for o, t in zip(runs["ours"], runs["trl"])]
        result["trl_over_ours"] = spread(ratios)
    return result


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.6), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], rows):
        for offset, side in ((-0.2, "ours"), (0.2, "trl")):
            fractions = [row["phases"][phase].get(f"{side}_fraction") or 0.0 for phase in PHASES]
            ax.bar([i + offset for i in range(len(PHASES))], fractions, width=0.4,
                   label={"ours": "ours (full script)", "trl": "TRL 0.21"}[side])
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(PHASES)), [phase.replace("_", "\n") for phase in PHASES], fontsize=7)
        ax.set_title(f"{row['algorithm'].upper()}, {row['structure']}, {row['dtype']}", fontsize=9)
    axes[0][0].set_ylabel("achieved / roofline (median of runs)")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(args: Args) -> None:
    import torch
    from transformers import AutoConfig

    import tiny_world

    if args.updates < 2 or args.repeats < 1:
        sys.exit("error: --updates must be at least 2 (the first is warm-up) and --repeats at least 1")
    world = tiny_world.ensure_world()
    paths = memory_runtime.build_models(args.size, os.path.join(os.path.dirname(tiny_world.cache_dir()),
                                                                "pythia-shapes"))
    config = AutoConfig.from_pretrained(paths["sft_model_path"])
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    widths = {}
    for algorithm in args.algorithms:
        for structure in set(args.structures) | set(args.bf16_structures):
            batch = STRUCTURES[structure][algorithm][0]
            widths[structure, algorithm] = prompt_widths(world["dataset_name"], paths["sft_model_path"],
                                                         batch // args.rloo_k if algorithm == "rloo" else batch)
    decode_rows = tuple(sorted({STRUCTURES[s][a][0] for s, a in widths}))
    speed_width = widths.get(("speed", args.algorithms[0]), {"mean": 16})["mean"]
    peaks = machine_peaks(h, layers, vocab, 8 * round(speed_width + args.response_length), decode_rows)
    print(f"peaks: fp32 {peaks['fp32_peak_flops'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16_peak_flops'] / 1e9:.0f} "
          f"GFLOP/s, bandwidth {peaks['bandwidth'] / 1e9:.1f} GB/s (16 MB arrays: "
          f"{peaks['cache_bandwidth'] / 1e9:.1f})", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in args.dtypes:
            for structure in (args.structures if dtype == "fp32" else args.bf16_structures):
                for algorithm in args.algorithms:
                    measured = measure_row(args, paths, world["dataset_name"], dtype, structure, algorithm, scratch)
                    row = {"dtype": dtype, "structure": structure, "algorithm": algorithm,
                           "prompt_width": widths[structure, algorithm], **measured, "phases": {}}
                    trained = (measured["ours"].get("trained_m") or 0) * 1e6
                    batch = STRUCTURES[structure][algorithm][0]
                    floor = peaks["decode_matmul_s"][f"{dtype}_{batch}"]  # one decode step's matmuls
                    row["generation_matmul_floor_s"] = args.response_length * floor
                    for side in ("ours", "trl"):
                        passes = phase_passes(side, algorithm, structure, h, layers, vocab,
                                              widths[structure, algorithm]["mean"], args.response_length, trained,
                                              dtype)
                        for phase in PHASES:
                            bound = roofline_seconds(passes[phase], peaks)
                            entry = row["phases"].setdefault(phase, {})
                            entry[f"{side}_roofline_s"] = bound
                            if measured[side] and "failed" not in measured[side]:
                                seconds = measured[side][f"{phase}_s"]["median"]
                                entry[f"{side}_fraction"] = bound / seconds if seconds > 0 else None
                    rows.append(row)
    lines = [f"pythia-{args.size} shape (vocabulary {vocab}) as every model, RLOO k={args.rloo_k}, "
             f"{args.response_length} tokens per completion, this CPU ({peaks['threads']} threads). Peaks measured "
             f"here: fp32 GEMM {peaks['fp32_peak_flops'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16_peak_flops'] / 1e9:.0f}"
             f" GFLOP/s (the best of the model's shapes), bandwidth {peaks['bandwidth'] / 1e9:.1f} GB/s (the faster "
             f"of an in-place add, {peaks['bandwidth_add'] / 1e9:.1f}, and a read-only sum, "
             f"{peaks['bandwidth_read'] / 1e9:.1f}, over 512 MB arrays; {peaks['cache_bandwidth'] / 1e9:.1f} over "
             "16 MB ones). Seconds per update: the median "
             f"of {args.repeats} runs' medians over updates 2..{args.updates}, [the runs' range]; fraction: roofline /"
             " median. TRL / ours: the median of each run pair's own ratio. TRL's other: each run's median update "
             "minus its phases' medians, then the median over runs.", ""]
    for row in rows:
        batch, minibatches, micro, epochs = STRUCTURES[row["structure"]][row["algorithm"]]
        ours, trl = row["ours"], row["trl"]
        total = (f"ours {ours['s_per_update']['median']:.2f} s/update" if "s_per_update" in ours
                 else f"ours failed: {ours.get('failed')}")
        if "s_per_update" in trl:
            ratio = row.get("trl_over_ours", {})
            total += (f", TRL {trl['s_per_update']['median']:.2f}; TRL / ours {ratio.get('median', 0):.2f}x "
                      f"[{ratio.get('min', 0):.2f}-{ratio.get('max', 0):.2f}]")
        lines += [f"**{row['algorithm'].upper()}, {row['structure']} ({batch} completions, {minibatches} minibatch(es)"
                  f" x {micro} micro-batch(es), {epochs} epoch(s)), {row['dtype']}**, prompt width "
                  f"{row['prompt_width']['mean']:.1f} (10-90th percentile of batches: {row['prompt_width']['p10']}-"
                  f"{row['prompt_width']['p90']}): {total}. Generation's matmuls alone, at F.linear's speed here: "
                  f"{row['generation_matmul_floor_s']:.3f} s, so at most "
                  f"{row['phases']['generation']['ours_roofline_s'] / row['generation_matmul_floor_s']:.0%} of its "
                  "roofline.", "",
                  "| phase | ours: roofline s | ours: measured s | ours: fraction | TRL: roofline s | "
                  "TRL: measured s | TRL: fraction |", "|---|---|---|---|---|---|---|"]
        for phase in PHASES:
            entry, cells = row["phases"][phase], []
            for side in ("ours", "trl"):
                cells.append(f"{entry[f'{side}_roofline_s']:.3f}")
                if row[side] and "failed" not in row[side]:
                    value = row[side][f"{phase}_s"]
                    fraction = entry.get(f"{side}_fraction")
                    cells += [f"{value['median']:.3f} [{value['min']:.3f}-{value['max']:.3f}]",
                              f"{fraction:.0%}" if fraction is not None else "(none run)"]
                else:
                    cells += ["not run", ""]
            lines.append(f"| {phase} | " + " | ".join(cells) + " |")
        other = [f"{row[side]['other_s']['median']:.3f} [{row[side]['other_s']['min']:.3f}-"
                 f"{row[side]['other_s']['max']:.3f}]" if "other_s" in row[side] else "not run"
                 for side in ("ours", "trl")]
        lines += [f"| other (no model work counted) | | {other[0]} | | | {other[1]} | |", ""]
    table = "\n".join(lines)
    print(table)
    prefix = args.output or os.path.join(ROOT, "benchmark", "results", "roofline_cpu")
    memory_runtime.write_results(prefix, "benchmark/roofline.py", table,
                                 {"args": asdict(args), "peaks": peaks, "torch": torch.__version__, "rows": rows})
    plot(rows, prefix + ".png")
    print(f"wrote {prefix}.md, .json and .png")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
