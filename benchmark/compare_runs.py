"""Summarise finished runs of rloo.py / ppo.py as one markdown table, one row per configuration.

Runs that differ only in --seed are one configuration: each cell is the mean over its seeds, ± their standard
deviation when there are several. The label of a row is what sets it apart from the other rows (script and
any argument that differs). With --gold, each saved policy is judged against the reference summaries by the
tiny world's gold judge (tiny-world runs only).

    python benchmark/compare_runs.py runs/rloo__tiny__1__* runs/ppo__tiny__1__* --gold
"""

import json
import os
import statistics
import sys
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PER_RUN_ARGS = {"seed", "output_dir"}  # what may differ within one configuration
DERIVED_ARGS = {"batch_size", "mini_batch_size", "num_updates"}  # follow from the others; never a label


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """output directories of finished runs (each with args.json and metrics.jsonl)"""
    gold: bool = False
    """judge each saved policy with the tiny world's gold judge (validation prompts)"""
    gold_prompts: int = 512
    """validation prompts the gold judge sees per policy"""
    output: str = ""
    """also write the table (and the per-run figures as JSON next to it) to this markdown file"""


def summarise_run(run_dir: str, gold: bool, gold_prompts: int) -> dict:
    """The figures of one run: averages over updates, the first and the last 10% of updates, the final policy."""
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    if not metrics:
        sys.exit(f"error: {run_dir} has no metrics; is it a finished run?")
    tenth = max(1, len(metrics) // 10)
    series = lambda name, part=slice(None): [m[name] for m in metrics[part]]  # noqa: E731
    figures = {
        "updates": len(metrics),
        "scores, last 10%": statistics.mean(series("objective/scores", slice(-tenth, None))),
        "rlhf_reward, first 10%": statistics.mean(series("objective/rlhf_reward", slice(0, tenth))),
        "rlhf_reward, last 10%": statistics.mean(series("objective/rlhf_reward", slice(-tenth, None))),
        "kl at update 1": metrics[0]["objective/kl"],
        "kl, last 10%": statistics.mean(series("objective/kl", slice(-tenth, None))),
        "clipfrac (mean)": statistics.mean(series("policy/clipfrac_avg")),
        "first-minibatch token ratio std": statistics.mean(series("diag/ratio_token_std")),
        "first-minibatch token ratio min": min(series("diag/ratio_token_min")),
        "first-minibatch token ratio max": max(series("diag/ratio_token_max")),
        "first-minibatch tokens clipped": statistics.mean(series("diag/clipfrac_token")),
        "first-minibatch sequences clipped": statistics.mean(series("diag/clipfrac_seq")),
        "s/update (median)": statistics.median(series("time/update")),
    }
    if gold:
        import tiny_world

        figures["gold win rate"] = tiny_world.evaluate(run_dir, n_prompts=gold_prompts)["gold_win_rate"]
    return {"run_dir": run_dir, "args": args, "figures": figures}


def configuration(args: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in args.items() if k not in PER_RUN_ARGS))


def table(summaries: list) -> str:
    groups = {}
    for summary in summaries:
        groups.setdefault(configuration(summary["args"]), []).append(summary)
    # A row's label: the script (exp_name) and every argument whose value differs among the runs that have it
    # (an argument only one script has, such as rloo_k, labels rows only when it varies within that script).
    keys = sorted({k for config in groups for k, _ in config} - DERIVED_ARGS - {"exp_name"})
    varying = [k for k in keys if len({dict(config)[k] for config in groups if k in dict(config)}) > 1]
    columns = list(summaries[0]["figures"])
    lines = ["| run | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for config, members in groups.items():
        config = dict(config)
        label = " ".join([json.loads(config["exp_name"])] + [f"{k}={json.loads(config[k])}" for k in varying if k in config])
        cells = []
        for column in columns:
            values = [m["figures"][column] for m in members]
            mean = statistics.mean(values)
            cell = f"{mean:.4g}" if column != "updates" else str(round(mean))
            if len(values) > 1 and column != "updates":
                cell += f" ± {statistics.stdev(values):.2g}"
            cells.append(cell)
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args) -> None:
    summaries = [summarise_run(run, args.gold, args.gold_prompts) for run in args.runs]
    text = table(summaries)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(summaries, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
