"""The bf16 ratio study: how far PPO's ratio is from 1 before any update, per precision, and why.

Before the first optimizer step the policy has not moved, so the ratio exp(new - old) that PPO clips should be
exactly 1. It is not when the old logprobs come from another computation than the training forward (the
source document's "dark side"; transformers issue 31267). This samples one batch as rloo.py does and compares
the logprobs of the sampled tokens taken in different ways, for every precision:

- the old-logprob sources, each against the training forward over a shuffled minibatch: `generate` (the
  sampling pass's own, KV-cache decoding, as TRL 0.11 takes generate()'s logits) and `forward` (a separate no-grad forward over the rollout chunk);
- the causes, one factor at a time: (a) incremental decoding with a KV cache vs one full forward of the same
  batch; (b) a left-padded batch vs each sequence alone; (c) the logits computed in the low precision vs in
  fp32 from the same hidden states, and a log-softmax taken in the low precision; (d) the whole policy in the
  low precision vs in fp32.

Precisions: `autocast` keeps fp32 weights and computes in the low precision (what rloo.py and ppo.py do);
`weights` stores the weights in it (the blog's measurement, and DeepSpeed's bf16 mode).

    python benchmark/ratio_diagnostics.py                    # the tiny world, CPU, about a minute
    python benchmark/ratio_diagnostics.py --model pythia-1b  # the public SFT checkpoint (GPU, hub access)
"""

import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import datasets
import transformers
import tyro
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rloo import PRESETS, TokenLogprob, forward, policy_forward, ratio_diagnostics, sample  # noqa: E402

Precision = Literal["fp32", "bf16-autocast", "bf16-weights", "fp16-autocast", "fp16-weights"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Args:
    model: str = "tiny"
    """rloo.py preset whose SFT policy, tokenizer, prompts and sampling settings are used (tiny, pythia-1b, ...)"""
    sft_model_path: str = ""
    """the policy to study (hub name or local directory; default: the preset's)"""
    tokenizer_path: str = ""
    """its tokenizer (default: the policy's own, or the preset's)"""
    dataset_name: str = ""
    """prompt dataset (default: the preset's)"""
    num_sequences: int = 256
    """completions sampled, one per prompt"""
    response_length: Optional[int] = None
    """most tokens per completion (default: the preset's)"""
    precisions: tuple[Precision, ...] = ("fp32", "bf16-autocast", "bf16-weights", "fp16-autocast", "fp16-weights")
    """precisions to measure; one the device cannot run is reported as skipped"""
    cliprange: float = 0.2
    """clip range whose clipped fractions are reported"""
    seed: int = 1
    """seed of the prompt choice and of sampling (the same for every precision)"""
    output: str = ""
    """JSON file for the results (default: benchmark/results/ratio_diagnostics_{model}.json)"""


def resolve(args: Args) -> dict:
    """The preset's settings with the overrides applied; the tiny world builds itself when needed."""
    preset = PRESETS.get(args.model)
    if preset is None:
        sys.exit(f"error: unknown --model {args.model!r}; choose one of {', '.join(PRESETS)}")
    sft, dataset = args.sft_model_path or preset.sft_model_path, args.dataset_name or preset.dataset_name
    if args.model == "tiny" and not (sft and dataset):
        import tiny_world

        world = tiny_world.ensure_world()
        sft, dataset = sft or world["sft_model_path"], dataset or world["dataset_name"]
    return {"sft_model_path": sft, "dataset_name": dataset,
            "tokenizer_path": args.tokenizer_path or (preset.tokenizer_path if not args.sft_model_path else "") or sft,
            "response_length": args.response_length or preset.response_length, "temperature": preset.temperature,
            "max_prompt_length": preset.max_prompt_length, "prompt_column": preset.prompt_column,
            "rollout_batch_size": min(preset.local_rollout_forward_batch_size, args.num_sequences),
            "train_batch_size": min(preset.per_device_train_batch_size, args.num_sequences)}


def logprob_sources(policy, precision, queries, pad_id, stop_id, settings, seed):
    """Sample completions under `precision` and return the logprobs of their tokens taken every way studied,
    as a dict of (N, R) tensors, with the response mask."""
    dtype, storage = DTYPES[precision.split("-")[0]], (precision.split("-") + ["autocast"])[1]
    device_type = queries.device.type
    model = policy
    if storage == "weights":  # loaded in the dtype, never a second fp32 copy on the device
        model = AutoModelForCausalLM.from_pretrained(settings["sft_model_path"], dtype=dtype).to(queries.device).eval()
    low = lambda: torch.autocast(device_type, dtype=dtype, enabled=storage == "autocast" and dtype != torch.float32)  # noqa: E731
    temperature, response_length = settings["temperature"], settings["response_length"]
    context_length = queries.shape[1]
    torch.manual_seed(seed)  # after loading, so that every precision samples from the same random stream
    out = {name: [] for name in ("generate", "forward", "low_head", "fp32_head", "low_log_softmax", "fp32_log_softmax",
                                 "fp32_policy", "alone", "query_response", "attention_mask", "response_mask")}
    for start in range(0, len(queries), settings["rollout_batch_size"]):
        query = queries[start : start + settings["rollout_batch_size"]]
        with torch.no_grad(), low():
            response, response_mask, generated = sample(model, query, pad_id, stop_id, response_length, temperature)
            attention_mask = torch.cat([query != pad_id, response_mask], 1)
            query_response = torch.cat([query, response], 1)
            out["generate"].append(generated)
            out["forward"].append(
                policy_forward(model, query_response, attention_mask, context_length, temperature).logprobs)
            # (c): the same hidden states through the output layer in the precision and in fp32; then the same
            # tempered logits through a log-softmax in the precision (what log_softmax(bf16 logits) does) and in fp32.
            backbone = getattr(model, model.base_model_prefix)
            hidden = forward(backbone, query_response, attention_mask).last_hidden_state[:, context_length - 1 : -1]
            head = model.get_output_embeddings()
            low_logits = head(hidden)
            with torch.autocast(device_type, enabled=False):  # autocast would cast these back down
                bias = head.bias.float() if head.bias is not None else None
                fp32_logits = F.linear(hidden.float(), head.weight.float(), bias)
                tempered = (low_logits.float() / temperature).to(dtype)
                for name, logits in (("low_log_softmax", tempered), ("fp32_log_softmax", tempered.float())):
                    out[name].append(torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1).float())
            out["low_head"].append(TokenLogprob.apply(low_logits, response, temperature))
            out["fp32_head"].append(TokenLogprob.apply(fp32_logits, response, temperature))
        with torch.no_grad():
            out["fp32_policy"].append(
                policy_forward(policy, query_response, attention_mask, context_length, temperature).logprobs)
        # (b): every sequence alone, without any padding.
        alone = torch.zeros(len(query), response_length, device=query.device)
        for row in range(len(query)):
            ids = query_response[row][attention_mask[row]].unsqueeze(0)
            own_context = int((query[row] != pad_id).sum())
            with torch.no_grad(), low():
                lp = policy_forward(model, ids, torch.ones_like(ids, dtype=torch.bool), own_context,
                                    temperature).logprobs
            alone[row, : lp.shape[1]] = lp[0]
        out["alone"].append(alone)
        out["query_response"].append(query_response)
        out["attention_mask"].append(attention_mask)
        out["response_mask"].append(response_mask)
    out = {name: torch.cat(tensors) for name, tensors in out.items()}
    # The training forward: shuffled minibatches of the training size, with gradients on, as in training.
    out["train"] = torch.zeros_like(out["forward"])
    order = torch.randperm(len(queries))
    for start in range(0, len(queries), settings["train_batch_size"]):
        idx = order[start : start + settings["train_batch_size"]]
        with low():
            out["train"][idx] = policy_forward(model, out["query_response"][idx], out["attention_mask"][idx],
                                                  context_length, temperature).logprobs.detach()
    return out


# (label, kind, new, old): the ratio is exp(new - old), a label "X vs Y" reads exp(X - Y). "source" rows: the
# training forward against each source of old logprobs. `generate` is what the first minibatch sees with
# --old-logprobs generate; `forward` is a separate no-grad pass, which the scripts use for every minibatch but the
# first (the first reuses its own training forward: exactly 1 by construction). "cause" rows: one factor at a time.
COMPARISONS = [
    ("generate", "source", "train", "generate"),
    ("forward (a separate pass)", "source", "train", "forward"),
    ("(a) one full forward vs KV-cache decoding, same batch", "cause", "forward", "generate"),
    ("(b) a left-padded batch vs each sequence alone", "cause", "forward", "alone"),
    ("(c) the output layer in fp32 vs in the precision, same hidden states", "cause", "fp32_head", "low_head"),
    ("(c) a log-softmax in the precision vs in fp32, same logits", "cause", "low_log_softmax", "fp32_log_softmax"),
    ("(d) the policy in fp32 vs in the precision", "cause", "fp32_policy", "forward"),
]


def measure(policy, tokenizer, queries, precision, settings, cliprange, seed) -> list:
    """One row per comparison: the ratio statistics of rloo.py's diagnostics, keys without the diag/ prefix."""
    stop_id = tokenizer.eos_token_id
    logprobs = logprob_sources(policy, precision, queries, tokenizer.pad_token_id, stop_id, settings, seed)
    mask = logprobs["response_mask"]
    rows = []
    for label, kind, new, old in COMPARISONS:
        stats = ratio_diagnostics(logprobs[new].masked_fill(~mask, 0), logprobs[old].masked_fill(~mask, 0), mask,
                                  cliprange)
        rows.append({"precision": precision, "comparison": label, "kind": kind,
                     **{key.removeprefix("diag/"): value for key, value in stats.items()}})
    return rows


def load_queries(settings, tokenizer, num_sequences, seed):
    """`num_sequences` distinct prompts drawn at random from the train split, left-padded to the longest."""
    dataset = load_dataset(settings["dataset_name"], split="train")
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for i in torch.randperm(len(dataset), generator=generator).tolist():
        ids = tokenizer(dataset[i][settings["prompt_column"]], add_special_tokens=False)["input_ids"]
        if len(ids) <= settings["max_prompt_length"]:
            prompts.append(ids)
        if len(prompts) == num_sequences:
            break
    if len(prompts) < num_sequences:
        sys.exit(f"error: only {len(prompts)} prompts fit max_prompt_length {settings['max_prompt_length']}; "
                 "lower --num-sequences")
    width = max(map(len, prompts))
    return torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids for ids in prompts])


def markdown(rows, settings) -> str:
    fmt = lambda r, kind: f"{r[f'ratio_{kind}_mean']:.6f} ± {r[f'ratio_{kind}_std']:.1e}"  # noqa: E731
    span = lambda r, kind: f"[{r[f'ratio_{kind}_min']:.4f}, {r[f'ratio_{kind}_max']:.4f}]"  # noqa: E731
    lines = [f"Policy {settings['sft_model_path']}, {settings['num_sequences']} completions of up to "
             f"{settings['response_length']} tokens, temperature {settings['temperature']}, device {settings['device']}; "
             f"ratio = exp(training forward - old logprobs) before any update; clipped = outside "
             f"[{1 - settings['cliprange']:g}, {1 + settings['cliprange']:g}].", "",
             "| precision | old logprobs | token ratio mean ± std | token ratio range | sequence ratio mean ± std "
             "| sequence ratio range | tokens clipped | sequences clipped |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "source":
            lines.append(f"| {r['precision']} | {r['comparison']} | {fmt(r, 'token')} | {span(r, 'token')} | "
                         f"{fmt(r, 'seq')} | {span(r, 'seq')} | {r['clipfrac_token']:.2%} | {r['clipfrac_seq']:.2%} |")
    precisions = list(dict.fromkeys(r["precision"] for r in rows if r["kind"] == "cause"))
    lines += ["", "Where the mismatch comes from, one factor at a time (a row 'X vs Y' is the ratio exp(X - Y)): "
              "token-ratio std / largest |ratio - 1| / sequences clipped.", "",
              "| cause | " + " | ".join(precisions) + " |", "|---|" + "---|" * len(precisions)]
    for label in [c[0] for c in COMPARISONS if c[1] == "cause"]:
        cells = []
        for precision in precisions:
            r = next(r for r in rows if r["precision"] == precision and r["comparison"] == label)
            worst = max(r["ratio_token_max"] - 1, 1 - r["ratio_token_min"])
            cells.append(f"{r['ratio_token_std']:.1e} / {worst:.1e} / {r['clipfrac_seq']:.0%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(args: Args):
    """(settings, tokenizer, fp32 policy, left-padded queries) on the best device, as rloo.py loads them."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    settings = resolve(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings.update(num_sequences=args.num_sequences, cliprange=args.cliprange, device=device.type)
    tokenizer = AutoTokenizer.from_pretrained(settings["tokenizer_path"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # as rloo.py does for Pythia
    policy = AutoModelForCausalLM.from_pretrained(settings["sft_model_path"], dtype=torch.float32).to(device).eval()
    queries = load_queries(settings, tokenizer, args.num_sequences, args.seed).to(device)
    return settings, tokenizer, policy, queries


def main(args: Args) -> None:
    settings, tokenizer, policy, queries = load(args)
    rows, skipped = [], {}
    for precision in args.precisions:
        try:
            rows += measure(policy, tokenizer, queries, precision, settings, args.cliprange, args.seed)
        except RuntimeError as error:
            if "not implemented" not in str(error):  # only a dtype this device has no kernels for is skipped
                raise
            skipped[precision] = str(error).splitlines()[0]
            print(f"skipped {precision}: {skipped[precision]}", file=sys.stderr)
    if not rows:
        sys.exit("error: no precision could run on this device; see the messages above")
    table = markdown(rows, settings)
    print(table)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                         f"ratio_diagnostics_{args.model}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"args": asdict(args), "settings": settings, "rows": rows, "skipped": skipped, "markdown": table},
                  f, indent=2)
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
