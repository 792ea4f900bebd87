"""Summarise finished runs of rloo.py / ppo.py as one markdown table, one row per configuration.

Runs that differ only in --seed are one configuration: each cell is the mean over its seeds, ± their standard
deviation when there are several. The label of a row is what sets it apart from the other rows (script and
any argument that differs). With --gold, each saved policy is judged against the reference summaries by the
tiny world's gold judge (tiny-world runs only); a run judged by benchmark/judge.py shows that judge's win rate.
A win rate's 95% interval is a t-interval over the seeds' win rates, or, for one run, its own interval over
prompts. --sft-baseline adds a row for the SFT policy the runs start from.

    python benchmark/compare_runs.py runs/rloo__tiny__1__* runs/ppo__tiny__1__* --gold
"""

import glob
import json
import os
import statistics
import sys
from dataclasses import dataclass

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t quantiles
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
    sft_baseline: bool = False
    """add a row for the tiny world's SFT policy, where every tiny run starts (needs --gold)"""
    columns: tuple[str, ...] = ()
    """the figures to show, by name and in this order (default: all)"""
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
        "training minutes": sum(series("time/update")) / 60,
        "peak memory (GB)": max(series("memory/peak_gb")),
    }
    if gold:
        figures.update(gold_figures(run_dir, gold_prompts))
    for path in sorted(glob.glob(os.path.join(run_dir, "judge_*", "result.json")))[:1]:  # benchmark/judge.py's
        with open(path) as f:
            judged = json.load(f)
        figures.update({"judge win rate": judged["win_rate"],
                        "judge win rate 95% CI": (judged["ci95"][1] - judged["ci95"][0]) / 2,
                        "judge mean length": judged["mean_length"], "judge failures": judged["failed"]})
    return {"run_dir": run_dir, "args": args, "figures": figures}


def gold_figures(policy_path: str, gold_prompts: int) -> dict:
    import tiny_world

    result = tiny_world.evaluate(policy_path, n_prompts=gold_prompts)
    return {"gold win rate": result["gold_win_rate"], "gold win rate 95% CI": result["gold_win_rate_ci95"],
            "gold score": result["gold_score"]}


def configuration(args: dict) -> tuple:
    return tuple(sorted((k, json.dumps(v)) for k, v in args.items() if k not in PER_RUN_ARGS))


def cell(column: str, values: list) -> str:
    """Mean over seeds, ± their standard deviation; an interval column is the 95% interval of the win rate."""
    if column.endswith(" 95% CI"):  # values are (win rate, the run's own half-width) pairs
        rates = [rate for rate, _ in values]
        half = values[0][1] if len(values) == 1 else T_975[len(values) - 1] * statistics.stdev(rates) / len(rates) ** 0.5
        mean = statistics.mean(rates)
        return f"[{mean - half:.3f}, {mean + half:.3f}]"
    mean = statistics.mean(values)
    text = str(round(mean)) if column == "updates" else f"{mean:.4g}"
    return text + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 and column != "updates" else "")


def table(summaries: list, columns=(), baseline=None) -> str:
    groups = {}
    for summary in summaries:
        groups.setdefault(configuration(summary["args"]), []).append(summary)
    # A row's label: the script (exp_name) and every argument whose value differs among the runs that have it
    # (an argument only one script has, such as rloo_k, labels rows only when it varies within that script).
    keys = sorted({k for config in groups for k, _ in config} - DERIVED_ARGS - {"exp_name"})
    varying = [k for k in keys if len({dict(config)[k] for config in groups if k in dict(config)}) > 1]
    columns = list(columns or summaries[0]["figures"])
    lines = ["| run | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for config, members in groups.items():
        config = dict(config)
        label = " ".join([json.loads(config["exp_name"])] + [f"{k}={json.loads(config[k])}" for k in varying if k in config])
        cells = []
        for column in columns:
            values = [m["figures"][column] for m in members]
            if column.endswith(" 95% CI"):
                values = [(m["figures"][column.removesuffix(" 95% CI")], m["figures"][column]) for m in members]
            cells.append(cell(column, values))
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    if baseline:
        name, figures = baseline
        cells = [cell(c, [(figures[c.removesuffix(" 95% CI")], figures[c]) if c.endswith(" 95% CI") else figures[c]])
                 if c in figures else "" for c in columns]
        lines.insert(2, f"| {name} | - | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: Args) -> None:
    if args.sft_baseline and not args.gold:
        sys.exit("error: --sft-baseline is judged by the gold judge; add --gold")
    summaries = [summarise_run(run, args.gold, args.gold_prompts) for run in args.runs]
    unknown = [c for c in args.columns if c not in summaries[0]["figures"]]
    if unknown:
        sys.exit(f"error: no figure named {unknown[0]!r} (add --gold for the gold ones); the figures are: "
                 + ", ".join(summaries[0]["figures"]))
    baseline = None
    if args.sft_baseline:
        import tiny_world

        baseline = ("SFT", gold_figures(tiny_world.ensure_world()["sft_model_path"], args.gold_prompts))
    text = table(summaries, args.columns, baseline)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(summaries, f, indent=2)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
