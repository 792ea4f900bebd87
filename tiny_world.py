"""A TL;DR in miniature, built offline in a minute or two: the default world of rloo.py and ppo.py.

It stands in for the public artefacts of Huang et al. 2024 with the same formats, so the scripts load it
with the same code (AutoTokenizer, AutoModelForCausalLM, AutoModelForSequenceClassification,
load_dataset):
- posts made of three "key" words among filler words, and a prompt in the TL;DR format;
- a reference summary per post, written by a careful but imperfect "human": the post's key words, now
  and then missing one or adding a filler;
- an SFT policy (Pythia architecture) trained on sloppier demonstrations: missing keys, fillers,
  invented keys, repeats, and now and then a ramble that never ends;
- a reward model initialised from the SFT backbone and trained on noisy preferences between the SFT
  policy's own samples (and demonstrations), labelled by the gold judge;
- a gold judge playing GPT-4's role: a summary scores the share of the post's keys it names, minus
  penalties for fillers, invented words and repeats.

    python tiny_world.py        # build (or load) the world and print a report on it
"""

import math
import os
import random
import shutil
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

VERSION = "v1"
EOS, PAD = "<|endoftext|>", "[PAD]"
SUBREDDITS = ["r/pets", "r/cooking", "r/travel", "r/work", "r/money", "r/games"]
TITLE_WORDS = ["help", "update", "question", "advice", "story"]
KEYS = ["cat", "dog", "rent", "boss", "trip", "pasta", "game", "car", "phone", "job", "loan", "exam",
        "flat", "bike", "gift", "date", "plant", "bill", "party", "flight", "cake", "team", "school", "doctor"]
FILLERS = ["um", "so", "really", "just", "like", "very", "basically", "honestly", "anyway", "well"]
VOCAB = [EOS, PAD, "SUBREDDIT:", "TITLE:", "POST:", "TL;DR:", *SUBREDDITS, *TITLE_WORDS, *KEYS, *FILLERS]
KEYS_PER_POST = 3
RESPONSE_LENGTH = 16
SEED = 1234


# ----------------------------------------------------------------------------------------------
# The task and its gold judge
# ----------------------------------------------------------------------------------------------


def post_keys(prompt: str) -> list:
    """The key words of the post body, in order."""
    body = prompt.split("POST:", 1)[1].split("TL;DR:", 1)[0]
    return [word for word in body.split() if word in KEYS]


def gold_score(prompt: str, response: str) -> float:
    """Quality of a summary: the share of the post's keys it names, minus 0.25 per filler word,
    0.5 per word that is neither a key of the post nor a filler, and 0.25 per repeated word.
    Special tokens are ignored (a summary is judged on its words). The best summary scores 1."""
    keys = post_keys(prompt)
    words = [word for word in response.split() if word not in (EOS, PAD)]
    covered = len(set(words) & set(keys)) / len(keys)
    fillers = sum(word in FILLERS for word in words)
    foreign = sum(word not in keys and word not in FILLERS for word in words)
    repeats = len(words) - len(set(words))
    return covered - 0.25 * fillers - 0.5 * foreign - 0.25 * repeats


def gold_judge(prompt: str, response: str, reference: str) -> float:
    """GPT-4's role: 1 if the response is the better summary, 0.5 for a tie, 0 if the reference wins."""
    ours, theirs = gold_score(prompt, response), gold_score(prompt, reference)
    return 1.0 if ours > theirs + 1e-9 else 0.5 if abs(ours - theirs) <= 1e-9 else 0.0


def gold_reward(prompts: list, completions: list, **columns) -> list:
    """The gold judge's score as a reward function, the oracle a learned reward model stands in for:
    python rloo.py --reward-fn tiny_world:gold_reward --reward-model-path none"""
    return [gold_score(prompt, completion) for prompt, completion in zip(prompts, completions)]


def win_rate(judgements: list) -> tuple:
    """(win rate, half-width of its 95% normal interval) of gold_judge verdicts (1 win, 0.5 tie, 0 loss)."""
    n = len(judgements)
    rate = sum(judgements) / n
    std = math.sqrt(sum((j - rate) ** 2 for j in judgements) / (n - 1)) if n > 1 else 0.0
    return rate, 1.96 * std / math.sqrt(n)


def make_post(rng: random.Random):
    keys = rng.sample(KEYS, KEYS_PER_POST)
    body = []
    for key in keys:
        body += rng.sample(FILLERS, rng.randint(0, 2)) + [key]
    body += rng.sample(FILLERS, rng.randint(0, 1))
    title = f"{keys[0]} {rng.choice(TITLE_WORDS)}"
    prompt = f"SUBREDDIT: {rng.choice(SUBREDDITS)}\n\nTITLE: {title}\n\nPOST: {' '.join(body)}\n\nTL;DR:"
    return prompt, keys


def reference_summary(rng: random.Random, keys: list) -> str:
    """A careful human: every key in order, but 30% of the time one is missed and half the time a filler
    slips in."""
    words = list(keys)
    if rng.random() < 0.3:
        words.pop(rng.randrange(len(words)))
    if rng.random() < 0.5:
        words.insert(rng.randint(0, len(words)), rng.choice(FILLERS))
    return " ".join(words)


def demonstration(rng: random.Random, keys: list):
    """A sloppy demonstrator; returns (summary, ended). One in ten demonstrations rambles without end."""
    words = [key for key in keys if rng.random() < 0.75]
    for _ in range(sum(rng.random() < 0.35 for _ in range(3))):
        words.insert(rng.randint(0, len(words)), rng.choice(FILLERS))
    if rng.random() < 0.2:
        words.insert(rng.randint(0, len(words)), rng.choice([k for k in KEYS if k not in keys]))
    if words and rng.random() < 0.15:
        words.insert(rng.randint(0, len(words)), rng.choice(words))
    if rng.random() < 0.1:
        return " ".join(words + [rng.choice(FILLERS + keys) for _ in range(RESPONSE_LENGTH)]), False
    return " ".join(words), True


# ----------------------------------------------------------------------------------------------
# Building the artefacts
# ----------------------------------------------------------------------------------------------


def cache_dir() -> str:
    root = os.environ.get("TINY_WORLD_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rlhf-tiny-world")
    return os.path.join(root, VERSION)


def world_paths(root: str) -> dict:
    return {"sft_model_path": os.path.join(root, "sft"), "reward_model_path": os.path.join(root, "reward"),
            "dataset_name": os.path.join(root, "dataset")}


def log(message: str) -> None:
    print(f"[tiny_world] {message}", file=sys.stderr, flush=True)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   pad_token=PAD, padding_side="left")


def model_config():
    from transformers import GPTNeoXConfig

    # Pythia's architecture at toy size; like Pythia, more embedding rows than tokens.
    return GPTNeoXConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=64, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0,
                         attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def batch_tensors(sequences, pad_id):
    """Right-padded (B, T) ids and mask; positions count from each sequence's first token."""
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


def train_sft(config, tokenizer, examples, rng):
    """examples: (prompt, summary, ended); the loss is on the summary tokens (and its EOS)."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(SEED)
    model = GPTNeoXForCausalLM(config)
    encoded = []
    for prompt, summary, ended in examples:
        query = tokenizer(prompt)["input_ids"]
        response = (tokenizer(summary)["input_ids"] + ([tokenizer.eos_token_id] if ended else []))[:RESPONSE_LENGTH]
        encoded.append((query + response, len(query)))

    def batch_loss():
        batch = [encoded[rng.randrange(len(encoded))] for _ in range(64)]
        ids, mask = batch_tensors([ids for ids, _ in batch], tokenizer.pad_token_id)
        labels = ids.masked_fill(mask == 0, -100)
        for row, (_, query_length) in enumerate(batch):
            labels[row, :query_length] = -100
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return fit(model, batch_loss, steps=400, lr=2e-3, warmup=50, name="sft")


def fit(model, batch_loss, steps, lr, warmup, name):
    """AdamW with a linear warm-up and decay, gradient clipping; batch_loss() draws a batch and returns its loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = lambda step: min(1.0, (step + 1) / warmup) * (1 - step / steps)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(steps):
        loss = batch_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            log(f"  {name} step {step}/{steps}  loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def sample(model, tokenizer, prompts, temperature, response_length=RESPONSE_LENGTH, batch_size=256):
    """Sampled summaries (text up to and including EOS when there is one), like rloo.py samples them."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=response_length, do_sample=True, temperature=temperature, top_k=0,
                              top_p=1.0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts = []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        output = model.generate(**encoded, generation_config=config)
        for row in output[:, encoded["input_ids"].shape[1] :].tolist():
            row = row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
            texts.append(tokenizer.decode(row))
    return texts


def reward_inputs(tokenizer, prompts, responses):
    """query + response ids (responses carry their EOS as text), right-padded, and the last real index."""
    sequences = [tokenizer(p)["input_ids"] + tokenizer(r)["input_ids"] for p, r in zip(prompts, responses)]
    ids, mask = batch_tensors(sequences, tokenizer.pad_token_id)
    return ids, mask, mask.sum(1) - 1


def rm_scores(reward_model, ids, mask, last_index):
    # Read exactly as rloo.py reads it: the score head on the backbone's hidden state at the last real token.
    hidden = reward_model.gpt_neox(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    hidden = hidden.last_hidden_state[torch.arange(len(ids)), last_index]
    return reward_model.score(hidden).squeeze(-1)


def train_reward_model(config, sft, tokenizer, pairs, rng):
    """Bradley-Terry on (prompt, chosen, rejected), from the SFT backbone (Huang et al. 2024)."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(SEED)
    config = GPTNeoXConfig(**config.to_dict())
    config.num_labels = 1
    model = GPTNeoXForSequenceClassification(config)
    model.gpt_neox.load_state_dict(sft.gpt_neox.state_dict())

    def batch_loss():
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(32)]
        prompts = [p for p, _, _ in batch] * 2
        responses = [c for _, c, _ in batch] + [r for _, _, r in batch]
        scores = rm_scores(model, *reward_inputs(tokenizer, prompts, responses))
        return -F.logsigmoid(scores[: len(batch)] - scores[len(batch) :]).mean()

    return fit(model, batch_loss, steps=300, lr=1e-3, warmup=30, name="reward model")


def one_edit(rng: random.Random, keys: list, summary: str):
    """A summary and a copy with one edit (a key swapped for a foreign one, a word repeated, a filler added,
    a key dropped): labellers also compare such near pairs, which pin down what each word is worth."""
    words = summary.split()
    edited = list(words)
    edit = rng.randrange(4)
    if edit == 0 and edited:
        edited[rng.randrange(len(edited))] = rng.choice([k for k in KEYS if k not in keys])
    elif edit == 1 and edited:
        edited.insert(rng.randint(0, len(edited)), rng.choice(edited))
    elif edit == 2 or not edited:
        edited.insert(rng.randint(0, len(edited)), rng.choice(FILLERS))
    else:
        edited.pop(rng.randrange(len(edited)))
    pair = [summary + f" {EOS}", " ".join(edited) + f" {EOS}"]
    rng.shuffle(pair)
    return tuple(pair)


def preference_pairs(rng, prompts, candidates):
    """Pairs of candidate summaries of the same prompt; the labeller prefers the better one under the gold
    judge with probability sigmoid(gold difference / 0.1), so close calls are noisy."""
    pairs = []
    for prompt, (a, b) in zip(prompts, candidates):
        difference = gold_score(prompt, a) - gold_score(prompt, b)
        if abs(difference) < 1e-9:
            continue
        a_wins = rng.random() < 1 / (1 + math.exp(-difference / 0.1))
        pairs.append((prompt, a, b) if a_wins else (prompt, b, a))
    return pairs


def build(root: str) -> None:
    from datasets import Dataset
    from transformers import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    start = time.time()
    rng = random.Random(SEED)
    tokenizer = make_tokenizer()
    log("writing the tokenizer and the prompt dataset")
    splits = {"train": 20000, "validation": 1000, "test": 1000}
    posts = {}
    for split, size in splits.items():
        rows = []
        for i in range(size):
            prompt, keys = make_post(rng)
            reference = reference_summary(rng, keys)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reference}]
            rows.append({"id": f"{split}-{i}", "prompt": prompt, "messages": messages})
            posts.setdefault(split, []).append((prompt, keys))
        Dataset.from_list(rows).to_parquet(os.path.join(root, "dataset", "data", f"{split}.parquet"))

    log("training the SFT policy on sloppy demonstrations")
    config = model_config()
    examples = [(prompt, *demonstration(rng, keys)) for prompt, keys in posts["train"][:15000]]
    sft = train_sft(config, tokenizer, examples, rng)
    sft.save_pretrained(world_paths(root)["sft_model_path"])
    tokenizer.save_pretrained(world_paths(root)["sft_model_path"])

    log("labelling pairs of the SFT policy's own samples (and demonstrations) with the gold judge")
    rm_posts = posts["train"][15000:]
    rm_prompts = [prompt for prompt, _ in rm_posts]
    sampled = [sample(sft, tokenizer, rm_prompts, temperature) for temperature in (0.7, 1.0)]
    # Like the samples, a finished demonstration carries its EOS: the reward model reads the score there.
    demos = [(lambda text, ended: text + f" {EOS}" * ended)(*demonstration(rng, keys)) for _, keys in rm_posts]
    edits = [one_edit(rng, keys, reference_summary(rng, keys)) for _, keys in rm_posts]
    candidates = [(sampled[0][i], sampled[1][i]) if i % 3 == 0 else (sampled[i % 2][i], demos[i]) if i % 3 == 1
                  else edits[i] for i in range(len(rm_posts))]
    pairs = preference_pairs(rng, rm_prompts, candidates)
    log(f"training the reward model on {len(pairs)} pairs")
    reward_model = train_reward_model(config, sft, tokenizer, pairs, rng)
    # Scale the head so scores have unit spread over the SFT policy's samples, so that kl_coef means the same
    # thing here as with the public reward models (Huang et al. normalise theirs too).
    with torch.no_grad():
        scores = rm_scores(reward_model, *reward_inputs(tokenizer, rm_prompts, sampled[0]))
        reward_model.score.weight /= scores.std()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model.save_pretrained(world_paths(root)["reward_model_path"])
    tokenizer.save_pretrained(world_paths(root)["reward_model_path"])
    log(f"built in {time.time() - start:.0f}s")


def ensure_world() -> dict:
    """Build the world once (atomically: in a temporary directory renamed into place) and return its paths."""
    root = cache_dir()
    if not os.path.isdir(root):
        os.makedirs(os.path.dirname(root), exist_ok=True)
        log(f"building the tiny world in {root} (once; a minute or two on 2 CPU cores)")
        staging = tempfile.mkdtemp(prefix=f".{VERSION}-", dir=os.path.dirname(root))
        try:
            with torch.random.fork_rng():
                build(staging)
            os.rename(staging, root)
        except OSError:
            if not os.path.isdir(root):  # a rename fails when another process built it first; anything else is real
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return world_paths(root)


# ----------------------------------------------------------------------------------------------
# Evaluation: the gold judge's verdict on a policy
# ----------------------------------------------------------------------------------------------


def evaluate(model_or_path, n_prompts=256, temperature=0.7, response_length=RESPONSE_LENGTH, seed=0) -> dict:
    """Sample one summary per validation prompt and judge it against the reference with the gold judge.
    Returns the gold win rate (ties count half) with the half-width of its 95% normal interval over prompts,
    the mean gold and reward-model scores, and the share that ended with EOS."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    paths = ensure_world()
    tokenizer = AutoTokenizer.from_pretrained(paths["sft_model_path"])
    model = model_or_path
    if isinstance(model_or_path, str):
        model = AutoModelForCausalLM.from_pretrained(model_or_path)
    model.eval()
    reward_model = AutoModelForSequenceClassification.from_pretrained(paths["reward_model_path"]).eval()
    rows = load_dataset(paths["dataset_name"], split="validation").select(range(n_prompts))
    prompts, references = list(rows["prompt"]), [m[1]["content"] for m in rows["messages"]]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        responses = sample(model, tokenizer, prompts, temperature, response_length)
    with torch.no_grad():
        rewards = rm_scores(reward_model, *reward_inputs(tokenizer, prompts, responses))
    rate, ci95 = win_rate(list(map(gold_judge, prompts, responses, references)))
    return {
        "gold_win_rate": rate,
        "gold_win_rate_ci95": ci95,
        "gold_score": sum(map(gold_score, prompts, responses)) / n_prompts,
        "reference_gold_score": sum(map(gold_score, prompts, references)) / n_prompts,
        "reward_score": rewards.mean().item(),
        "eos_rate": sum(EOS in r for r in responses) / n_prompts,
    }


def report() -> None:
    """What a person checks before trusting the world: is the SFT policy worse than the references, does the
    reward model agree with the gold judge on the policy's own samples, and does best-of-n by it help?"""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    paths = ensure_world()
    sft = AutoModelForCausalLM.from_pretrained(paths["sft_model_path"]).eval()
    print("SFT policy:", {k: round(v, 3) for k, v in evaluate(sft, n_prompts=512).items()})
    tokenizer = AutoTokenizer.from_pretrained(paths["sft_model_path"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(paths["reward_model_path"]).eval()
    rng = random.Random(7)
    posts = [make_post(rng) for _ in range(256)]
    prompts = [p for p, _ in posts]
    references = [reference_summary(rng, keys) for _, keys in posts]
    n = 8
    samples = [sample(sft, tokenizer, prompts, 0.7) for _ in range(n)]  # n x 256
    with torch.no_grad():
        rewards = torch.stack([rm_scores(reward_model, *reward_inputs(tokenizer, prompts, s)) for s in samples])
    gold = torch.tensor([[gold_score(p, r) for p, r in zip(prompts, s)] for s in samples])
    agree = total = 0
    for i in range(len(prompts)):
        for a in range(n):
            for b in range(a + 1, n):
                if abs(gold[a, i] - gold[b, i]) > 1e-9:
                    total += 1
                    agree += (rewards[a, i] - rewards[b, i]) * (gold[a, i] - gold[b, i]) > 0
    print(f"reward model vs gold on pairs of SFT samples: {agree / total:.3f} agreement over {total} pairs")
    pearson = torch.corrcoef(torch.stack([rewards.flatten(), gold.flatten()]))[0, 1]
    print(f"pearson(reward, gold) on SFT samples: {pearson:.3f}")
    for chooser, name in ((rewards, "reward model"), (gold, "gold judge")):
        best = chooser.argmax(0)
        chosen = [samples[best[i]][i] for i in range(len(prompts))]
        win = sum(map(gold_judge, prompts, chosen, references)) / len(prompts)
        print(f"best-of-{n} by the {name}: gold win rate {win:.3f}")
    first = sum(map(gold_judge, prompts, samples[0], references)) / len(prompts)
    print(f"best-of-1: gold win rate {first:.3f}")


if __name__ == "__main__":
    report()
