"""The paper's evaluation: a policy's TL;DR summaries against the reference summaries, judged by an LLM.

1. Generate one summary per evaluation prompt with the saved policy: batched transformers generation, or vLLM
   with --vllm when it is installed.
2. Send each (post, policy summary, reference summary) to a chat model through an OpenAI-compatible API
   (--judge-model, --base-url; the key is read from the environment variable --api-key-env names). The two
   summaries are shown in a random order, and the judge names the better one, or a tie.
3. Report the policy's win rate (a tie counts half) with its 95% interval, the mean lengths, and how many
   judgements failed. A failed or unparseable answer is retried, then counted as failed and reported, never
   dropped. Every judgement is appended to judgements.jsonl as it arrives; a rerun resumes from that file,
   asking again only what failed (summaries made with other generation settings are refused, not mixed in).

    python benchmark/judge.py --policy runs/rloo__pythia-1b__1__1795480388 --judge-model gpt-4o --num-prompts 1000
"""

import concurrent.futures
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Optional

import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tiny_world import win_rate  # noqa: E402


@dataclass
class Args:
    policy: str
    """the saved policy (a directory written by rloo.py or ppo.py, or a hub name) with its tokenizer"""
    output_dir: str = ""
    """where summaries.jsonl, judgements.jsonl and result.json go (default: {policy}/judge_{judge_model})"""
    dataset_name: str = "trl-internal-testing/tldr-preference-sft-trl-style"
    """evaluation prompts and reference summaries (the `prompt` column; the reference is the last message)"""
    split: str = "validation"
    """split of the dataset to evaluate on (recorded in result.json with the rest of the arguments)"""
    num_prompts: int = 1000
    """how many prompts, the first of the split (0: all)"""
    response_length: int = 53
    """most tokens per summary"""
    temperature: float = 0.0
    """sampling temperature of the policy (0: greedy)"""
    batch_size: int = 32
    """prompts per generation batch (transformers)"""
    vllm: bool = False
    """generate with vLLM instead of transformers"""
    judge_model: str = "gpt-4o"
    """the judge, a chat model name as the API knows it"""
    base_url: str = "https://api.openai.com/v1"
    """the OpenAI-compatible API; /chat/completions is appended"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key (an empty key is sent as none, for local servers)"""
    num_workers: int = 8
    """judgements in flight at once"""
    max_attempts: int = 3
    """tries per judgement before it counts as failed"""
    timeout: float = 60.0
    """seconds to wait for one answer"""
    retry_delay: float = 2.0
    """seconds before the first retry, doubled at each further one"""
    seed: int = 0
    """seed of generation and of the order in which the two summaries are shown"""


JUDGE_PROMPT = """You compare two summaries of the same Reddit post. The better summary states the post's most \
important points precisely and concisely, and leaves out what is unimportant or irrelevant.

Post:
{post}

Summary A:
{a}

Summary B:
{b}

Compare the two summaries in one sentence. Then, on a line of its own, write "Preferred: A", "Preferred: B", \
or "Preferred: TIE" if neither is better."""

VERDICT = re.compile(r"(?i:preferred):\s*\**\s*(?:(?i:summary)\s+)?(A|B|TIE|(?i:tie))\b")


def parse_verdict(answer: str) -> Optional[str]:
    """'A', 'B' or 'TIE' from the judge's last "Preferred:" line; None when there is none."""
    found = VERDICT.findall(answer)
    return found[-1].upper() if found else None


def ask(args: Args, prompt: str) -> str:
    """One chat completion; raises on HTTP errors, timeouts and malformed responses."""
    body = json.dumps({"model": args.judge_model, "temperature": 0.0, "max_tokens": 256,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(args.api_key_env, "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(args.base_url.rstrip("/") + "/chat/completions", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=args.timeout) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def judge_one(args: Args, item: dict, policy_first: bool) -> dict:
    """Judge one policy summary against its reference. The verdict is from the policy's side: 1 win,
    0.5 tie, 0 loss, None when every attempt failed (with the last error)."""
    a, b = (item["summary"], item["reference"]) if policy_first else (item["reference"], item["summary"])
    prompt = JUDGE_PROMPT.format(post=item["post"], a=a.strip(), b=b.strip())
    record = {**item, "judge_model": args.judge_model, "policy_shown_as": "A" if policy_first else "B",
              "verdict": None, "answer": None, "error": None, "attempts": 0}
    for attempt in range(args.max_attempts):
        record["attempts"] = attempt + 1
        try:
            record["answer"] = ask(args, prompt)
            choice = parse_verdict(record["answer"])
            if choice is not None:
                record["error"] = None
                record["verdict"] = 0.5 if choice == "TIE" else float(choice == record["policy_shown_as"])
                return record
            record["error"] = "no 'Preferred: A|B|TIE' line in the answer"
        except urllib.error.HTTPError as error:
            record["error"] = f"HTTP {error.code}: {error.read()[:300].decode(errors='replace')}"
            if 400 <= error.code < 500 and error.code not in (408, 429):  # a bad request or key: retrying won't help
                return record
        except Exception as error:  # noqa: BLE001  (anything else is recorded against this item, never raised)
            record["error"] = f"{type(error).__name__}: {error}"
        if attempt + 1 < args.max_attempts:
            time.sleep(args.retry_delay * 2**attempt)
    return record


def judge_all(args: Args, items: list, path: str) -> list:
    """Judge every item that `path` holds no successful judgement of (the same summaries, reference and judge),
    appending each record as it arrives."""
    same = lambda record, item: all(record.get(k) == item[k] for k in ("summary", "reference")) and \
        record.get("judge_model") == args.judge_model  # noqa: E731
    items_by_id = {item["id"]: item for item in items}
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash: that item is asked again
                    continue
                item = items_by_id.get(record.get("id"))
                if record.get("verdict") is not None and item is not None and same(record, item):
                    done[record["id"]] = record
    order = random.Random(args.seed)
    policy_first = {item["id"]: order.random() < 0.5 for item in items}  # fixed per item, across reruns
    todo = [item for item in items if item["id"] not in done]
    pool = concurrent.futures.ThreadPoolExecutor(args.num_workers)
    try:
        with open(path, "a") as f:
            futures = [pool.submit(judge_one, args, item, policy_first[item["id"]]) for item in todo]
            for count, future in enumerate(concurrent.futures.as_completed(futures), 1):
                record = future.result()
                f.write(json.dumps(record) + "\n")  # the main thread writes: one whole line per record
                f.flush()
                done[record["id"]] = record
                if count % 50 == 0 or count == len(futures):
                    print(f"judged {count}/{len(futures)}", flush=True)
    finally:  # on Ctrl-C or a crash, requests not yet sent are cancelled rather than paid for and lost
        pool.shutdown(wait=False, cancel_futures=True)
    return [done[item["id"]] for item in items]


def report(records: list, tokenizer=None) -> dict:
    judged = [r["verdict"] for r in records if r["verdict"] is not None]
    rate, half = win_rate(judged) if judged else (float("nan"), float("nan"))
    length = (lambda text: len(tokenizer(text)["input_ids"])) if tokenizer else (lambda text: len(text.split()))
    return {"win_rate": rate, "ci95": [rate - half, rate + half], "judged": len(judged),
            "failed": len(records) - len(judged),
            "failures": sorted({r["error"] for r in records if r["verdict"] is None}),
            "policy_shown_first": sum(r["policy_shown_as"] == "A" for r in records) / max(1, len(records)),
            "mean_length": sum(length(r["summary"]) for r in records) / max(1, len(records)),
            "mean_reference_length": sum(length(r["reference"]) for r in records) / max(1, len(records)),
            "length_unit": "tokens" if tokenizer else "words"}


def generate_summaries(args: Args, prompts: list, tokenizer) -> list:
    """One summary per prompt, cut at the first EOS, special tokens removed."""
    if args.vllm:
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.policy, seed=args.seed, dtype="bfloat16")  # as the transformers path on a GPU
        params = SamplingParams(temperature=args.temperature, max_tokens=args.response_length,
                                stop_token_ids=[tokenizer.eos_token_id])
        return [output.outputs[0].text for output in llm.generate(prompts, params)]

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.bfloat16 if device.type == "cuda"
                                                 else torch.float32).to(device).eval()
    greedy = args.temperature == 0
    # On the model, as rloo.py sets it: generate() fills a passed config's unset fields from the model's own.
    model.generation_config = GenerationConfig(
        max_new_tokens=args.response_length, do_sample=not greedy, temperature=None if greedy else args.temperature,
        top_k=None if greedy else 0, top_p=None if greedy else 1.0, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    summaries = []
    for start in range(0, len(prompts), args.batch_size):
        batch = tokenizer(prompts[start : start + args.batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        with torch.no_grad():
            output = model.generate(**batch)
        for row in output[:, batch["input_ids"].shape[1] :].tolist():
            row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
            summaries.append(tokenizer.decode(row, skip_special_tokens=True))
        print(f"generated {len(summaries)}/{len(prompts)}", flush=True)
    return summaries


def main(args: Args) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    output_dir = args.output_dir or os.path.join(args.policy, f"judge_{args.judge_model.replace('/', '_')}")
    os.makedirs(output_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    summaries_path = os.path.join(output_dir, "summaries.jsonl")
    generation = {k: getattr(args, k) for k in ("policy", "dataset_name", "split", "num_prompts", "response_length",
                                                "temperature", "vllm", "seed")}
    settings_path = os.path.join(output_dir, "generation.json")
    if os.path.exists(summaries_path):  # a rerun judges the same summaries, made with the same settings
        with open(settings_path) as f:
            made_with = json.load(f)
        if made_with != generation:
            changed = ", ".join(f"--{k.replace('_', '-')} {made_with.get(k)!r} -> {v!r}" for k, v in generation.items()
                                if made_with.get(k) != v)
            sys.exit(f"error: {output_dir} holds summaries made with other settings ({changed}); "
                     "use another --output-dir or delete it")
        with open(summaries_path) as f:
            items = [json.loads(line) for line in f]
        print(f"reusing {len(items)} summaries from {summaries_path}")
    else:
        dataset = load_dataset(args.dataset_name, split=args.split)
        if args.num_prompts:
            dataset = dataset.select(range(min(args.num_prompts, len(dataset))))
        prompts = list(dataset["prompt"])
        summaries = generate_summaries(args, prompts, tokenizer)
        items = [{"id": str(row.get("id", i)), "post": prompt, "summary": summary,
                  "reference": row["messages"][-1]["content"]}
                 for i, (row, prompt, summary) in enumerate(zip(dataset, prompts, summaries))]
        with open(settings_path, "w") as f:
            json.dump(generation, f, indent=2)
        with open(summaries_path + ".tmp", "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
        os.replace(summaries_path + ".tmp", summaries_path)  # written last: its presence means both are complete
    records = judge_all(args, items, os.path.join(output_dir, "judgements.jsonl"))
    result = {"args": asdict(args), **report(records, tokenizer)}
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"win rate {result['win_rate']:.3f} [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}] over "
          f"{result['judged']} judged ({result['failed']} failed), mean length {result['mean_length']:.1f} "
          f"{result['length_unit']} (references {result['mean_reference_length']:.1f}); {output_dir}/result.json")
    if result["failed"]:
        print(f"{result['failed']} judgements failed: {'; '.join(result['failures'])}", file=sys.stderr)
    if not result["judged"]:
        sys.exit("error: no judgement succeeded; check --base-url, --judge-model and the API key")


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
