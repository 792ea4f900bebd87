"""Reward-model overoptimization in miniature (Gao et al. 2023, "Scaling laws for reward model overoptimization").

Every kept checkpoint of each run (and the SFT policy, at KL 0) samples one completion per held-out prompt (the
tiny world's validation split, temperature as in training); each completion gets its gold score (the tiny world's
gold judge, the truth), its proxy score (the learned reward model the runs trained on) and its KL to the SFT
policy, sum over tokens of log pi(y_t) - log pi_sft(y_t) under the sampling temperature (the k1 estimator, the
training's objective/kl, here on prompts no run trained on). Writes a table of every point and a plot of gold
and proxy score against KL, one line per run.

    bash benchmark/overoptimization.sh          # trains the runs, then calls this
    python benchmark/overoptimization.py runs/overopt/rloo_kl0.0_1 ... --output benchmark/results/overoptimization
"""

import json
import os
import sys
from dataclasses import dataclass

import torch
import tyro
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tiny_world  # noqa: E402
from rloo import policy_forward, reward_scores, sample  # noqa: E402 (the scripts' own sampler and readers)


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """output directories of tiny-world runs kept with --keep-checkpoints large enough"""
    prompts: int = 512
    """held-out prompts per point"""
    output: str = "benchmark/results/overoptimization"
    """prefix of the .md, .json and .png written"""
    command: str = ""
    """the command that made the runs, written above the table"""


def label(run_args: dict) -> str:
    source = "gold (oracle)" if run_args.get("reward_fn") else "proxy RM"
    return f"{run_args['script'].removesuffix('.py')}, {source}, kl_coef {run_args['kl_coef']}"


@torch.no_grad()
def measure(policy, ref_policy, reward_model, tokenizer, prompts, temperature, response_length, seed=0) -> dict:
    """Mean gold score, proxy score and KL to the SFT policy over one sampled completion per prompt."""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    gold, proxy, kl = [], [], []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # every point samples with the same seed
    for start in range(0, len(prompts), 128):
        texts = prompts[start : start + 128]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        width = max(map(len, ids))
        queries = torch.tensor([[pad_id] * (width - len(row)) + row for row in ids])
        responses, mask, _ = sample(policy, queries, pad_id, eos_id, response_length, temperature)
        query_responses, attention_mask = torch.cat([queries, responses], 1), torch.cat([queries != pad_id, mask], 1)
        logprobs = policy_forward(policy, query_responses, attention_mask, width, temperature).logprobs
        ref_logprobs = policy_forward(ref_policy, query_responses, attention_mask, width, temperature).logprobs
        kl += ((logprobs - ref_logprobs) * mask).sum(1).tolist()
        proxy += reward_scores(reward_model, query_responses, attention_mask, width + mask.sum(1) - 1).tolist()
        completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
        gold += tiny_world.gold_reward(texts, completions)
    torch.random.set_rng_state(generator_state)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"gold": mean(gold), "proxy": mean(proxy), "kl": mean(kl)}


def main(args: Args) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    paths = tiny_world.ensure_world()
    tokenizer = AutoTokenizer.from_pretrained(paths["sft_model_path"], padding_side="left")
    ref_policy = AutoModelForCausalLM.from_pretrained(paths["sft_model_path"]).eval()
    policy = AutoModelForCausalLM.from_pretrained(paths["sft_model_path"]).eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(paths["reward_model_path"]).eval()
    prompts = list(load_dataset(paths["dataset_name"], split="validation")["prompt"][: args.prompts])
    points = []
    for run in args.runs:
        with open(os.path.join(run, "args.json")) as f:
            run_args = json.load(f)
        checkpoints = sorted(name for name in os.listdir(os.path.join(run, "checkpoints")) if name[7:].isdigit())
        for update, weights in [(0, None), *((int(name[7:]), os.path.join(run, "checkpoints", name)) for name in
                                            checkpoints)]:
            state = load_file(os.path.join(weights, "model.safetensors")) if weights else ref_policy.state_dict()
            # (a ppo.py checkpoint holds the policy and the value model side by side)
            policy.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if "value_model." not in k})
            point = measure(policy, ref_policy, reward_model, tokenizer, prompts, run_args["temperature"],
                            run_args["response_length"])
            points.append({"run": run, "label": label(run_args), "seed": run_args["seed"], "update": update, **point})
            print(f"{points[-1]['label']} seed {run_args['seed']} update {update}: gold {point['gold']:+.3f} "
                  f"proxy {point['proxy']:+.3f} kl {point['kl']:.3f}", flush=True)
    write(args, points)


def write(args: Args, points: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output + ".json", "w") as f:
        json.dump(points, f, indent=1)
    lines = [f"`{args.command}`\n" if args.command else "",
             f"Gold and proxy score and KL to the SFT policy, mean over {args.prompts} held-out prompts, one sampled "
             "completion each (same seed at every point). The peak is each run's highest gold score.\n",
             "| run | seed | peak gold score | at KL | at update | final gold score | final proxy score | final KL |",
             "|---|---|---|---|---|---|---|---|"]
    for run in dict.fromkeys(point["run"] for point in points):
        own = [point for point in points if point["run"] == run]
        peak, last = max(own, key=lambda point: point["gold"]), own[-1]
        lines.append(f"| {last['label']} | {last['seed']} | {peak['gold']:+.3f} | {peak['kl']:.2f} | "
                     f"{peak['update']} | {last['gold']:+.3f} | {last['proxy']:+.3f} | {last['kl']:.2f} |")
    lines += ["\nEvery point:\n", "| run | seed | update | KL to SFT | gold score | proxy score | |",
              "|---|---|---|---|---|---|---|"]
    for run in dict.fromkeys(point["run"] for point in points):
        own = [point for point in points if point["run"] == run]
        peak = max(own, key=lambda point: point["gold"])
        lines += [f"| {p['label']} | {p['seed']} | {p['update']} | {p['kl']:.3f} | {p['gold']:+.3f} | "
                  f"{p['proxy']:+.3f} | {'peak' if p is peak else ''} |" for p in own]
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    figure, (gold_axis, proxy_axis) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for run in dict.fromkeys(point["run"] for point in points):
        own = [point for point in points if point["run"] == run]
        name = f"{own[0]['label']} (seed {own[0]['seed']})"
        kl = [point["kl"] for point in own]
        line, = gold_axis.plot(kl, [point["gold"] for point in own], marker="o", markersize=3, label=name)
        proxy_axis.plot(kl, [point["proxy"] for point in own], marker="o", markersize=3, color=line.get_color())
    gold_axis.set(xlabel="KL to the SFT policy (nats, held-out prompts)", ylabel="gold score (the truth)")
    proxy_axis.set(xlabel="KL to the SFT policy (nats, held-out prompts)", ylabel="proxy score (the reward model)")
    gold_axis.legend(fontsize=7)
    figure.suptitle("Reward-model overoptimization on the tiny world")
    figure.tight_layout()
    figure.savefig(args.output + ".png", dpi=120)
    print(f"wrote {args.output}.md, .json and .png")


if __name__ == "__main__":
    main(tyro.cli(Args))
