"""Summarise finished runs of rloo.py / ppo.py as one markdown table, one row per configuration.

Runs that differ only in --seed are one configuration: each cell is the mean over its seeds, ± their standard
deviation when there are several. The label of a row is what sets it apart from the other rows (script and
any argument that differs). With --gold, each saved policy is judged against the reference summaries by the
tiny world's gold judge (tiny-world runs only); a run judged by benchmark/judge.py shows that judge's win rate.
A win rate's 95% interval is a t-interval over the seeds' win rates (their spread on the same prompts), or,
for one run, its own normal interval over prompts: two different quantities, both clipped to [0, 1]. --sft-baseline adds a row for the SFT policy the runs start from.

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


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t: exact to 9 degrees of freedom, then 1.96 + 2.4 / df (within 0.01)."""
    return T_975.get(df, 1.96 + 2.4 / df)
PER_RUN_ARGS = {"seed", "output_dir"}  # what may differ within one configuration
DERIVED_ARGS = {"batch_size", "local_batch_size", "mini_batch_size", "num_updates"}  # follow from the others
SOURCE_ARGS = {"script", "script_sha256"}  # which code made a run: a fork is labelled by its --exp-name instead


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """output directories of finished runs (each with args.json and metrics.jsonl)"""
    gold: bool = False
    """judge each saved policy with the tiny world's gold judge (validation prompts)"""
    gold_prompts: int = 512
    """validation prompts the gold judge sees per policy"""
    judge_model: str = ""
    """which benchmark/judge.py result to show when a run holds several (judge_{model}/result.json)"""
    sft_baseline: bool = False
    """add a row for the tiny world's SFT policy, where every tiny run starts (needs --gold)"""
    columns: tuple[str, ...] = ()
    """the figures to show, by name and in this order (default: all)"""
    output: str = ""
    """also write the table (and the per-run figures as JSON next to it) to this markdown file"""
    label_args: tuple[str, ...] = ()
    """label rows by --exp-name and these arguments only (default: every argument whose value differs); rows that
    differ in another argument stay apart under one label"""
    plot: str = ""
    """also draw --plot-figure per configuration as a bar chart (PNG) to this file"""
    plot_figure: str = "gold win rate"
    """the figure the chart shows (a win rate gets its 95% interval as error bars, anything else ± std)"""


def summarise_run(run_dir: str, gold: bool, gold_prompts: int, judge_model: str = "") -> dict:
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
    if "rollout/mismatch_kl" in metrics[0]:  # the sampler against the learner (runs made since it could differ)
        figures.update({"mismatch kl (mean)": statistics.mean(series("rollout/mismatch_kl")),
                        "is ratio max": max(series("rollout/is_weight_max")),
                        "ess (mean)": statistics.mean(series("rollout/ess")),
                        "corrected share (mean)": statistics.mean(series("rollout/corrected_share"))})
    if gold:
        figures.update(gold_figures(run_dir, gold_prompts))
    pattern = f"judge_{judge_model.replace('/', '_')}" if judge_model else "judge_*"
    judged = sorted(glob.glob(os.path.join(run_dir, pattern, "result.json")))  # benchmark/judge.py's results
    if len(judged) > 1:
        sys.exit(f"error: {run_dir} holds results of several judges ({', '.join(judged)}); choose with --judge-model")
    for path in judged:
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
    args = {"world_size": 1, **args}  # runs from before data parallelism were single-process
    ignored = PER_RUN_ARGS | DERIVED_ARGS | SOURCE_ARGS
    return tuple(sorted((k, json.dumps(v)) for k, v in args.items() if k not in ignored))


def win_rate_interval(figures: list, rate: str) -> tuple:
    """(mean win rate, half-width of its 95% interval): a t-interval over seeds, or one run's own interval."""
    rates = [f[rate] for f in figures]
    if len(rates) == 1:
        return rates[0], figures[0][f"{rate} 95% CI"]
    return statistics.mean(rates), t_975(len(rates) - 1) * statistics.stdev(rates) / len(rates) ** 0.5


def cell(column: str, figures: list) -> str:
    """One configuration's cell: the mean over its seeds ± their standard deviation, or a win rate's interval
    (clipped to [0, 1]); empty when a seed lacks the figure."""
    if any(column not in f for f in figures):
        return ""
    if column.endswith(" 95% CI"):
        mean, half = win_rate_interval(figures, column.removesuffix(" 95% CI"))
        return f"[{max(0.0, mean - half):.3f}, {min(1.0, mean + half):.3f}]"
    values = [f[column] for f in figures]
    if column == "updates":
        return str(round(statistics.mean(values)))
    return f"{statistics.mean(values):.4g}" + (f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else "")


def labelled_rows(summaries: list, baseline=None, label_args=()) -> list:
    """[(label, seeds, [figures of each seed])], one per configuration, the baseline (name, figures) first.
    A label is the script (exp_name) and every argument whose value differs among the runs that have it (an
    argument only one script has, such as rloo_k, labels rows only when it varies within that script)."""
    groups = {}
    for summary in summaries:
        groups.setdefault(configuration(summary["args"]), []).append(summary)
    keys = sorted({k for config in groups for k, _ in config} - DERIVED_ARGS - {"exp_name"})
    varying = [k for k in keys if len({dict(config)[k] for config in groups if k in dict(config)}) > 1]
    varying = [k for k in varying if k in label_args] if label_args else varying
    rows = [(baseline[0], "-", [baseline[1]])] if baseline else []
    for config, members in groups.items():
        config = dict(config)
        label = " ".join([json.loads(config["exp_name"])] + [f"{k}={json.loads(config[k])}" for k in varying if k in config])
        rows.append((label, str(len(members)), [m["figures"] for m in members]))
    return rows


def table(summaries: list, columns=(), baseline=None, label_args=()) -> str:
    columns = list(columns or dict.fromkeys(name for summary in summaries for name in summary["figures"]))
    lines = ["| run | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for label, seeds, figures in labelled_rows(summaries, baseline, label_args):
        lines.append(f"| {label} | {seeds} | " + " | ".join(cell(c, figures) for c in columns) + " |")
    return "\n".join(lines)


def plot(summaries: list, figure: str, path: str, baseline=None, label_args=()) -> None:
    """A bar per configuration: the mean of `figure`, with its 95% interval for a win rate, else ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in labelled_rows(summaries, baseline, label_args) if all(figure in f for f in row[2])]
    means, errors = [], []
    for _, _, figures in rows:
        if f"{figure} 95% CI" in figures[0]:
            mean, half = win_rate_interval(figures, figure)
        else:
            values = [f[figure] for f in figures]
            mean, half = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        means.append(mean)
        errors.append(half)
    # horizontal bars, top to bottom in the table's order, so that long labels stay readable
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), means, xerr=errors, capsize=4, color="tab:blue")
    ax.set_yticks(range(len(rows)), [f"{label} ({seeds})" for label, seeds, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel(figure + " (seeds in brackets)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(args: Args) -> None:
    if args.sft_baseline and not args.gold:
        sys.exit("error: --sft-baseline is judged by the gold judge; add --gold")
    summaries = [summarise_run(run, args.gold, args.gold_prompts, args.judge_model) for run in args.runs]
    known = {name for summary in summaries for name in summary["figures"]}
    unknown = [c for c in (*args.columns, *([args.plot_figure] if args.plot else [])) if c not in known]
    if unknown:
        sys.exit(f"error: no run has a figure named {unknown[0]!r} (add --gold for the gold ones, run "
                 f"benchmark/judge.py for the judge ones); the figures are: {', '.join(sorted(known))}")
    baseline = None
    if args.sft_baseline:
        import tiny_world

        baseline = ("SFT", gold_figures(tiny_world.ensure_world()["sft_model_path"], args.gold_prompts))
    text = table(summaries, args.columns, baseline, args.label_args)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
            json.dump(summaries, f, indent=2)
    if args.plot:
        plot(summaries, args.plot_figure, args.plot, baseline, args.label_args)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
