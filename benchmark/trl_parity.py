"""Parity with TRL 0.21.0: the same batch in, the same numbers and the same weights out.

One fixed batch of prompts, and fixed completions for them, go through TRL 0.21.0's RLOOTrainer / PPOTrainer and
through rloo.py / ppo.py. Sampling is replaced on both sides by the same tokens (TRL's `batch_generation` returns
them with the logits of a forward pass, so that its old logprobs come from a forward as ours do; our `sample()`
returns them padded after the stop token, as it would), and the minibatch order is the same on both sides (the
permutations of TRL's numpy and our torch are replaced by one seeded order of the completions). The optimizer is
plain SGD on both sides, so that each optimizer step's weight change is lr times the gradient (under AdamW the
first step is about lr times the gradient's sign, which hides differences), and our gradient clipping is off
(TRL clips only under DeepSpeed). Everything that follows from the samples is compared: scores, KL, rewards,
advantages (and values, returns for PPO), the loss of every micro-batch, the gradient of every optimizer step
(its norm, its norm per tensor and its projection on a fixed random direction), the logged metrics, and the
weights at the end.

    python benchmark/trl_parity.py --trl-python /work/trl021-venv/bin/python            # the committed table
    python benchmark/trl_parity.py --trl-python ... --sizes small --write-fixture        # tests/fixtures/ values

The driver runs in the project's venv; each side runs in its own process (TRL from --trl-python, a venv made with
`pip install torch==2.13.0 trl==0.21.0 transformers==4.55.4`, see benchmark/trl_baseline.py). The models are
random Pythia-architecture models whose every weight is drawn from a seeded generator in name order, so that they
do not depend on the transformers version that builds them (tests/test_trl_parity.py rebuilds the small one).
"""

import argparse
import collections
import contextlib
import importlib
import inspect
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, PAD = 0, 1  # Pythia's EOS id is 0; the pad token is a separate one, as the scripts add it
TEMPERATURE, RESPONSE_LENGTH, PROMPTS = 0.7, 10, 8
# name: (hidden size, layers, heads, vocabulary, learning-rate scale). "70m" is Pythia-70m's shape; its gradients are
# larger (a near-uniform policy over 50304 tokens), so its cases run at 1/100 of the small model's learning rate.
SIZES = {"small": (32, 2, 4, 96, 1.0), "70m": (512, 6, 8, 50304, 0.01)}

# Each case runs both scripts' settings; "trl" gives TRL's own sizes where its PPOTrainer counts differently (its
# per_device_train_batch_size x gradient_accumulation_steps is the whole batch, without num_mini_batches).
CASES = {
    "rloo, 1 epoch": dict(script="rloo", updates=2, epochs=1, per_device=16, accumulation=1, minibatches=1,
                          rollout_chunk=16, lr=0.003),
    "rloo, 4 epochs x 2 minibatches x 2 micro-batches": dict(script="rloo", updates=3, epochs=4, per_device=4,
                                                               accumulation=2, minibatches=2, rollout_chunk=8,
                                                               lr=0.003),
    "ppo, 1 epoch": dict(script="ppo", updates=2, epochs=1, per_device=8, accumulation=1, minibatches=1,
                         rollout_chunk=8, lr=0.03),
    "ppo, 4 epochs x 2 minibatches": dict(script="ppo", updates=3, epochs=4, per_device=4, accumulation=1,
                                          minibatches=2, rollout_chunk=4, lr=0.03, trl=dict(per_device=8)),
    "ppo, 2 epochs x 2 accumulated micro-batches": dict(script="ppo", updates=3, epochs=2, per_device=4,
                                                        accumulation=2, minibatches=1, rollout_chunk=8, lr=0.03),
    # A named difference, measured: TRL's PPOTrainer stops generating once every row has ended, so its batch is as
    # wide as its longest completion, whose EOS then sits in the last column (its score on the EOS token itself).
    "ppo, 1 epoch, completions all ended early (TRL's PPO batch is narrower)": dict(
        script="ppo", updates=2, epochs=1, per_device=8, accumulation=1, minibatches=1, rollout_chunk=8, lr=0.03,
        completions="early_completions", trl_stops_at_eos=True),
}
# TRL 0.21's options, each run on both sides with it on: `options` in TRL's names, which are the full scripts' flags
# too ("STOP": the world's stop token). `trl_options` are TRL's alone: token_level_kl is measured against the
# scripts' sequence-level KL, which it should equal up to rounding (TRL sums the per-token penalty back up).
RLOO_1 = dict(CASES["rloo, 1 epoch"])
PPO_1 = dict(CASES["ppo, 1 epoch"])
CASES.update({
    "rloo, normalize_reward (clipped at 1)": dict(RLOO_1, options=dict(normalize_reward=True, reward_clip_range=1.0)),
    "rloo, normalize_advantage": dict(RLOO_1, options=dict(normalize_advantage=True)),
    # TRL's RLOO generates the full length and cuts each completion at its stop token after; val/num_eos_tokens
    # counts the EOS tokens of the uncut completions, those sampled after the stop token too.
    "rloo, stop_token_id": dict(RLOO_1, options=dict(stop_token=None, stop_token_id="STOP"),
                                differs=["metric val/num_eos_tokens"]),
    "rloo, token_level_kl (TRL only: the scripts' sequence KL)": dict(RLOO_1, trl_options=dict(token_level_kl=True)),
    "ppo, kl_estimator k3": dict(PPO_1, options=dict(kl_estimator="k3")),
    "ppo, stop_token_id": dict(PPO_1, options=dict(stop_token=None, stop_token_id="STOP")),
})
KL_COEF, CLIPRANGE, MISSING_EOS_PENALTY = 0.05, 0.2, 1.0


# ----------------------------------------------------------------------------------------------
# The world: models from a seed, a word-level tokenizer, prompts and their fixed completions.
# ----------------------------------------------------------------------------------------------


def canonical(name):
    """Parameter names as Pythia's checkpoints spell them (transformers 5 calls GPT-NeoX's `embed_out` `lm_head`)."""
    return name.replace("lm_head.", "embed_out.")


def seeded_fill(model, seed):
    """Every parameter drawn from one seeded generator in name order: norms' weights near 1, the reward and value
    head at 1/sqrt(hidden) (scores of order 1), everything else N(0, 0.02^2) (Pythia's init scale)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, param in sorted((canonical(n), p) for n, p in model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if "layernorm" in name or "layer_norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.02 * noise)
            elif name.startswith("score"):
                param.copy_(noise / math.sqrt(hidden))
            else:
                param.copy_(0.02 * noise)
    return model


def build_world(root, size):
    """Writes sft/ (policy and tokenizer), reward/ and prompts/ (a `prompt` text column) under root; returns their
    paths and the prompts' and completions' token ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification,
                              PreTrainedTokenizerFast)

    hidden, layers, heads, vocab, _ = SIZES[size]
    words = ["<|endoftext|>", "[PAD]"] + [f"w{i}" for i in range(2, vocab)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="[PAD]",
                                        padding_side="left")
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, max_position_embeddings=128, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0,
                           attention_dropout=0.0, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    paths = {name: os.path.join(root, name) for name in ("sft", "reward", "prompts")}
    seeded_fill(GPTNeoXForCausalLM(config), seed=1).save_pretrained(paths["sft"])
    tokenizer.save_pretrained(paths["sft"])
    config.num_labels = 1
    seeded_fill(GPTNeoXForSequenceClassification(config), seed=2).save_pretrained(paths["reward"])

    generator = torch.Generator().manual_seed(3)
    draw = lambda n: (torch.randint(2, min(vocab, 1000), (n,), generator=generator)).tolist()  # noqa: E731
    prompts = [draw(3 + i % 6) for i in range(PROMPTS)]  # 3 to 8 tokens: left padding is exercised
    os.makedirs(paths["prompts"])
    with open(os.path.join(paths["prompts"], "train.jsonl"), "w") as f:
        for ids in prompts:
            f.write(json.dumps({"prompt": " ".join(words[i] for i in ids)}) + "\n")
    # Two completions per prompt (RLOO's k=2; PPO takes the first). Where the EOS sits: early, late, at the very
    # first token, in the last column (no position after it for the score), or nowhere (the EOS trick's penalty).
    eos_at = [2, 5, 0, RESPONSE_LENGTH - 1, None, 7, 3, None, 1, 8, RESPONSE_LENGTH - 1, 4, None, 6, 2, 5]
    completions = {}
    for i, ids in enumerate(prompts):
        for j in range(2):
            raw = draw(RESPONSE_LENGTH)  # tokens after the EOS stay in the raw completion: TRL truncates them
            position = eos_at[(2 * i + j) % len(eos_at)]
            if position is not None:
                raw[position] = EOS
            completions[f"{i},{j}"] = raw
    # The same completions, all ended by column 6, with EOS after the first (as generate() pads a finished row when
    # the model has no pad token): what TRL's PPOTrainer gets, its generation stopping once every row has ended.
    early_completions = {}
    for k, (cid, raw) in enumerate(completions.items()):
        position = [2, 5, 0, 6, 3, 1, 4, 6][k % 8]
        early_completions[cid] = [t if t != EOS else 2 for t in raw[:position]] + [EOS] * (RESPONSE_LENGTH - position)
    # The stop token of the stop_token_id cases: the completions' most frequent token other than EOS
    counts = collections.Counter(t for raw in completions.values() for t in raw if t != EOS)
    stop_token_id = min(counts, key=lambda t: (-counts[t], t))
    world = {"paths": paths, "prompts": prompts, "completions": completions, "early_completions": early_completions,
             "stop_token_id": stop_token_id, "size": size, "checksum": weights_checksum(paths)}
    with open(os.path.join(root, "world.json"), "w") as f:
        json.dump(world, f)
    return world


def weights_checksum(paths):
    """A number that changes when any weight of the world's models does (to tell a changed world from a bug)."""
    from safetensors.torch import load_file

    total = 0.0
    for name in ("sft", "reward"):
        for key, tensor in sorted(load_file(os.path.join(paths[name], "model.safetensors")).items()):
            total += (tensor.double().flatten() * (1 + tensor.double().flatten().argsort().argsort() % 7)).sum().item()
    return total


# ----------------------------------------------------------------------------------------------
# What both sides share: the fixed samples, the minibatch order, and what is recorded.
# ----------------------------------------------------------------------------------------------


def options(case, world, side):
    """The case's TRL options on this side, the world's stop token in the place of "STOP"."""
    chosen = {**case.get("options", {}), **(case.get("trl_options", {}) if side == "trl" else {})}
    return {name: world["stop_token_id"] if value == "STOP" else value for name, value in chosen.items()}


def flags(chosen):
    """TRL options as the full scripts' flags of the same names."""
    return [word for name, value in chosen.items() for word in
            ([f"--{name.replace('_', '-')}"] if value is True else [f"--{name.replace('_', '-')}", str(value)])]


class Recorder:
    """Hands out the fixed completions, fixes the minibatch order, and records what the trainer computes.

    A completion is known by its canonical id "i,j" (prompt i, its j-th copy in the batch): each side lays its batch
    out in its own order, and everything recorded is put back in canonical order before it is compared."""

    def __init__(self, world, batch_size, completions="completions"):
        self.world, self.batch_size, self.completions = world, batch_size, completions
        self.prompt_index = {tuple(ids): i for i, ids in enumerate(world["prompts"])}
        self.ids, self.updates, self.epoch, self.steps, self.losses = [], [], 0, [], []
        self.names, self.directions = {}, {}

    def identify(self, queries):
        """Canonical ids of a chunk of left-padded queries, in the chunk's order; a full batch starts an update."""
        if len(self.ids) == self.batch_size:
            self.ids, self.epoch = [], 0
        if not self.ids:
            self.updates.append({"ids": self.ids})
        for query in queries.tolist():
            i = self.prompt_index[tuple(t for t in query if t != PAD)]
            j = sum(1 for cid in self.ids if cid.startswith(f"{i},"))
            self.ids.append(f"{i},{j}")
        return self.ids[-len(queries):]

    def completion(self, cid):
        return self.world[self.completions][cid]

    def permutation(self, n):
        """The minibatch order of this update's next epoch: one seeded order of the canonical ids, given as
        positions in this side's batch."""
        import torch

        assert n == len(self.ids) == self.batch_size, (n, len(self.ids))
        canonical = sorted(self.ids)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * len(self.updates) + self.epoch))
        self.epoch += 1
        position = {cid: k for k, cid in enumerate(self.ids)}
        return [position[canonical[k]] for k in order.tolist()]

    def snapshot(self, tensors):
        """This update's tensors (rows in this side's batch order), stored in canonical order, once per update."""
        update = self.updates[-1]
        if "tensors" in update:
            return
        rank = sorted(range(len(self.ids)), key=lambda k: self.ids[k])
        update["tensors"] = {name: [value[k] for k in rank] if isinstance(value, list) and len(value) == len(rank)
                             else value for name, value in tensors.items()}

    def name_parameters(self, named_parameters):
        self.names = {id(p): canonical(name) for name, p in named_parameters}

    def optimizer_step(self, optimizer, *args, **kwargs):
        """A global optimizer pre-hook: the gradient about to be applied, by parameter name."""
        import torch

        total, per_tensor, projection = 0.0, {}, 0.0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                name = self.names[id(p)]
                if name not in self.directions:  # a fixed random +-1 direction per tensor, seeded by its name
                    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    self.directions[name] = torch.randint(0, 2, p.shape, generator=generator).float() * 2 - 1
                grad = p.grad.detach().float()
                per_tensor[name] = grad.norm().item()
                total += per_tensor[name] ** 2
                projection += (grad * self.directions[name]).sum().item()
        self.steps.append({"norm": math.sqrt(total), "projection": projection, "per_tensor": per_tensor})


@contextlib.contextmanager
def traced(function, markers):
    """Calls markers[text](frame) each time `function`'s own frame reaches a line containing text (before the line
    runs): how both sides' intermediate tensors are read without editing either side's code."""
    lines, start = inspect.getsourcelines(function)
    at = {start + k: handler for k, line in enumerate(lines) for text, handler in markers.items() if text in line}
    missing = set(markers) - {text for text in markers for k, line in enumerate(lines) if text in line}
    if missing:
        raise RuntimeError(f"{function.__qualname__} has no line containing {sorted(missing)}")
    code = function.__code__

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in at:
            at[frame.f_lineno](frame)
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
    try:
        yield
    finally:
        sys.settrace(None)


def rows(tensor, mask=None):
    """A (B, ...) tensor as nested lists; masked-out entries as None (padding, where the two sides fill differently)."""
    tensor = tensor.detach().float().cpu()
    if mask is None:
        return tensor.tolist()
    return [[v if m else None for v, m in zip(r, mr)] for r, mr in zip(tensor.tolist(), mask.cpu().tolist())]


# ----------------------------------------------------------------------------------------------
# Our side: rloo.py / ppo.py, imported and run through main() with their own flags.
# ----------------------------------------------------------------------------------------------


def run_ours(world, case, output, full_script=False, precision="fp32"):
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    sys.path.insert(0, ROOT)
    module = importlib.import_module(case["script"] + ("_full" if full_script else ""))  # a core, or its full script
    rloo = case["script"] == "rloo"
    batch = case["per_device"] * case["accumulation"] * case["minibatches"]
    recorder = Recorder(world, batch, case.get("completions", "completions"))

    def fixed_sample(model, queries, pad_id, stop_id, max_tokens, temperature, top_p=1.0):
        """sample()'s contract with the fixed tokens: padding after the first stop token, the mask of the real ones."""
        tokens = torch.tensor([recorder.completion(cid) for cid in recorder.identify(queries)], device=queries.device)
        after_stop = (tokens == stop_id).long().cumsum(1) - (tokens == stop_id).long() > 0
        return tokens.masked_fill(after_stop, pad_id), ~after_stop, torch.zeros(tokens.shape, device=queries.device)

    randperm = torch.randperm

    def fixed_randperm(n, *args, **kwargs):  # the prompt order (drawn with a generator) is left alone
        if "generator" in kwargs:
            return randperm(n, *args, **kwargs)
        return torch.tensor(recorder.permutation(n), device=kwargs.get("device"))

    class SGD(torch.optim.SGD):  # in the place of the scripts' torch.optim.AdamW (a class: DeepSpeed subclasses it)
        def __init__(self, parameters, lr, **ignored):
            from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

            parameters = list(parameters)
            names = [n for n, _ in AutoModelForCausalLM.from_pretrained(world["paths"]["sft"]).named_parameters()]
            if not rloo:  # ppo.py trains [*policy.parameters(), *value_model.parameters()]
                value = AutoModelForSequenceClassification.from_pretrained(world["paths"]["reward"], num_labels=1)
                names = [f"policy.{n}" for n in names] + [f"value_model.{n}" for n, _ in value.named_parameters()]
            assert len(names) == len(parameters)
            recorder.name_parameters(zip(names, parameters))
            super().__init__(parameters, lr=lr)

    def at_epoch_loop(frame):
        v = frame.f_locals
        mask = v["response_mask"]
        tensors = {"scores": v["scores"].tolist(), "kl": rows(v["kl"]),
                   "non_score_reward": v["non_score_reward"].tolist(),
                   "rlhf_reward": v["rlhf_reward"].tolist(), "logprobs": rows(v["logprobs"], mask),
                   "ref_logprobs": rows(v["ref_logprobs"], mask), "response_mask": mask.long().tolist()}
        if rloo:
            tensors["advantages"] = v["advantages"].tolist()
        else:
            tensors.update(advantages=rows(v["advantages"]), rewards=rows(v["rewards"]), values=rows(v["values"]),
                           returns=rows(v["returns"]), value_mask=v["value_mask"].long().tolist())
        recorder.snapshot(tensors)

    def at_backward(frame):
        v = frame.f_locals
        advantages = v["advantages"][v["idx"]] if rloo else v["advantages"][v["idx"]][v["mask"]]
        recorder.losses.append({"policy": v["loss"].item(), "scale": advantages.abs().mean().item(),
                                **({} if rloo else {"value": v["vf_loss"].item()})})

    arguments = ["--sft-model-path", world["paths"]["sft"], "--reward-model-path", world["paths"]["reward"],
             "--dataset-name", world["paths"]["prompts"], "--output-dir", os.path.join(output + ".run"),
             "--dtype", precision, "--seed", "1", "--response-length", str(RESPONSE_LENGTH),
             "--temperature", str(TEMPERATURE), "--stop-token", "eos",
             "--missing-eos-penalty", str(MISSING_EOS_PENALTY),
             "--kl-coef", str(KL_COEF), "--cliprange", str(CLIPRANGE), "--num-ppo-epochs", str(case["epochs"]),
             "--num-mini-batches", str(case["minibatches"]), "--per-device-train-batch-size", str(case["per_device"]),
             "--gradient-accumulation-steps", str(case["accumulation"]), "--local-rollout-forward-batch-size",
             str(case["rollout_chunk"]), "--total-episodes", str(case["updates"] * batch), "--learning-rate",
             str(case["lr"] * SIZES[world["size"]][4]), "--max-grad-norm", "1e30", "--max-prompt-length", "64",
             *(["--rloo-k", "2"] if rloo else ["--vf-coef", "0.1", "--cliprange-value", "0.2", "--gamma", "1.0",
                                               "--lam", "0.95"]), *flags(options(case, world, "ours"))]
    args = module.parse_args(arguments)
    shutil.rmtree(output + ".run", ignore_errors=True)  # (a run of an earlier call)
    hook = register_optimizer_step_pre_hook(recorder.optimizer_step)
    module.sample, torch.randperm, torch.optim.AdamW = fixed_sample, fixed_randperm, SGD
    try:
        with traced(module.main, {"for epoch in range(args.num_ppo_epochs)": at_epoch_loop,
                                  "accelerator.backward(": at_backward}):
            module.main(args)
    finally:
        torch.randperm = randperm
        hook.remove()
    with open(os.path.join(output + ".run", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    from safetensors.torch import load_file

    saved = [("", output + ".run")] if rloo else [("policy.", output + ".run"),
                                                  ("value_model.", os.path.join(output + ".run", "value_model"))]
    state = {prefix + k: v for prefix, directory in saved
             for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}
    return finish(recorder, metrics, state, output)


def finish(recorder, metrics, state, output):
    import torch

    torch.save({canonical(k): v for k, v in state.items()}, output + ".weights.pt")
    result = {"updates": recorder.updates, "steps": recorder.steps, "losses": recorder.losses, "metrics": metrics}
    with open(output, "w") as f:
        json.dump(result, f)
    return result


# ----------------------------------------------------------------------------------------------
# TRL's side (run by --trl-python): its trainer as a library, generation replaced by the fixed tokens.
# ----------------------------------------------------------------------------------------------


def run_trl(world, case, output, precision="fp32"):
    import numpy as np
    import torch
    import trl

    if trl.__version__ != "0.21.0":  # the fixture pins TRL 0.21.0's numbers
        sys.exit(f"error: the TRL side needs trl==0.21.0, not {trl.__version__}; give --trl-python a venv with it")
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.trainer import ppo_trainer, rloo_trainer
    from trl.trainer.utils import forward as trl_forward

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from trl_baseline import load_tokenizer  # the project's tokenizer, saved by transformers 5, loaded by 4.55

    from datasets import Dataset

    rloo = case["script"] == "rloo"
    sizes = {**case, **case.get("trl", {})}
    batch = case["per_device"] * case["accumulation"] * case["minibatches"]
    recorder = Recorder(world, batch, case.get("completions", "completions"))
    chosen = options(case, world, "trl")
    tokenizer = load_tokenizer(world["paths"]["sft"])
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOS, PAD)

    def fixed_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        """batch_generation's contract with the fixed tokens: query + raw completion, and the logits divided by
        the temperature, here from one forward pass (so that TRL's old logprobs are a forward's, as ours)."""
        completions = torch.tensor([recorder.completion(cid) for cid in recorder.identify(queries)])
        if case.get("trl_stops_at_eos"):  # as wide as the longest completion, as PPOTrainer's generate() stops
            completions = completions[:, : int((completions == EOS).int().argmax(1).max()) + 1]
        stop = chosen.get("stop_token_id")
        if stop is not None and not rloo:  # PPOTrainer makes the stop token generate()'s EOS: padding after it
            completions = completions.masked_fill((completions == stop).cumsum(1) - (completions == stop).long() > 0,
                                                  PAD)  # (RLOOTrainer sets the policy's EOS to None: the full length)
        query_responses = torch.cat([queries, completions], 1)
        with torch.no_grad():  # in the chunks TRL's reference forward takes, so that its first KL is exactly 0
            logits = torch.cat([trl_forward(model, chunk, pad_token_id).logits[:, queries.shape[1] - 1 : -1]
                                for chunk in query_responses.split(local_rollout_forward_batch_size)])
        return query_responses, logits / generation_config.temperature

    def widen(table, fill):
        """Rows of a narrower batch (TRL's PPO, when every completion ended early) padded to the scripts' width."""
        return [row + [fill] * (RESPONSE_LENGTH - len(row)) for row in table]

    def at_epoch_loop(frame):
        v = frame.f_locals
        mask = ~v["padding_mask"]
        non_score = v["non_score_reward"] if rloo else v["non_score_reward"].sum(1)
        tensors = {"scores": v["scores"].tolist(), "kl": rows(v["kl"]), "non_score_reward": non_score.tolist(),
                   "rlhf_reward": (v["rlhf_reward"].flatten() if rloo else v["scores"] + non_score).tolist(),
                   "logprobs": rows(v["logprobs"], mask), "ref_logprobs": rows(v["ref_logprobs"], mask),
                   "response_mask": mask.long().tolist()}
        if rloo:
            tensors["advantages"] = v["advantages"].tolist()
        else:
            tensors.update(advantages=rows(v["advantages"]), rewards=rows(v["rewards"]), values=rows(v["values"]),
                           returns=rows(v["returns"]), value_mask=(~v["padding_mask_p1"]).long().tolist())
        for name, value in tensors.items():
            if isinstance(value[0], list):
                tensors[name] = widen(value, None if "logprobs" in name else 0)
        recorder.snapshot(tensors)

    def at_backward(frame):
        v = frame.f_locals
        advantages = v["mb_advantage"] if rloo else v["mb_advantage"][~v["padding_mask"][v["micro_batch_inds"]]]
        recorder.losses.append({"policy": v["pg_loss"].item(), "scale": advantages.abs().mean().item(),
                                **({} if rloo else {"value": v["vf_loss"].item()})})

    class Metrics(TrainerCallback):
        logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(dict(logs))

    load = lambda cls, path, **kw: cls.from_pretrained(path, torch_dtype=torch.float32, **kw)  # noqa: E731
    policy, ref_policy = load(AutoModelForCausalLM, world["paths"]["sft"]), load(AutoModelForCausalLM,
                                                                                  world["paths"]["sft"])
    reward_model = load(AutoModelForSequenceClassification, world["paths"]["reward"], num_labels=1)
    prompts = Dataset.from_dict({"input_ids": world["prompts"]})
    with tempfile.TemporaryDirectory() as output_dir:
        common = dict(output_dir=output_dir, seed=1, report_to="none", logging_steps=1, save_strategy="no",
                      push_to_hub=False, disable_tqdm=True, bf16=precision == "bf16", use_cpu=True, fp16=False,
                      optim="sgd",
                      learning_rate=case["lr"] * SIZES[world["size"]][4],
                      per_device_train_batch_size=sizes["per_device"],
                      gradient_accumulation_steps=case["accumulation"], num_mini_batches=case["minibatches"],
                      local_rollout_forward_batch_size=case["rollout_chunk"], total_episodes=case["updates"] * batch,
                      num_ppo_epochs=case["epochs"], response_length=RESPONSE_LENGTH, stop_token="eos",
                      missing_eos_penalty=MISSING_EOS_PENALTY, temperature=TEMPERATURE, num_sample_generations=0,
                      kl_coef=KL_COEF, cliprange=CLIPRANGE, sft_model_path=world["paths"]["sft"],
                      reward_model_path=world["paths"]["reward"])
        callback = Metrics()
        if rloo:
            config = trl.RLOOConfig(**{**common, "rloo_k": 2, **chosen})
            trainer = trl.RLOOTrainer(config=config, processing_class=tokenizer, policy=policy, ref_policy=ref_policy,
                                      reward_model=reward_model, train_dataset=prompts, callbacks=[callback])
            module, function = rloo_trainer, trl.RLOOTrainer.train
        else:
            value_model = load(AutoModelForSequenceClassification, world["paths"]["reward"], num_labels=1)
            config = trl.PPOConfig(**{**common, "vf_coef": 0.1, "cliprange_value": 0.2, "gamma": 1.0, "lam": 0.95,
                                      "whiten_rewards": False, "kl_estimator": "k1", **chosen})
            trainer = trl.PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                                     reward_model=reward_model, value_model=value_model, train_dataset=prompts,
                                     callbacks=[callback])
            module, function = ppo_trainer, trl.PPOTrainer.train
        if (config.batch_size, config.mini_batch_size) != (batch, batch // case["minibatches"]):
            sys.exit(f"error: TRL derived batch {config.batch_size}, minibatch {config.mini_batch_size} for {case}")
        # accelerate syncs (steps) at every micro-batch of the last batch of a pass over the dataset
        # (sync_with_dataloader): TRL's accumulation is off in those updates. Here the dataset is one batch, so that
        # would be every update; the harness turns it off, to compare the accumulation of all the other updates.
        trainer.accelerator.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
        recorder.name_parameters(trainer.model.named_parameters())
        hook = register_optimizer_step_pre_hook(recorder.optimizer_step)
        module.batch_generation = fixed_generation
        np.random.permutation = lambda n: np.array(recorder.permutation(n))
        with traced(function, {"for ppo_epoch_idx in range(args.num_ppo_epochs)": at_epoch_loop,
                               "accelerator.backward(loss)": at_backward}):
            trainer.train()
        hook.remove()
        state = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    metrics = [{k: v for k, v in m.items() if "/" in k or k in ("lr", "episode")} for m in callback.logged
               if "objective/kl" in m]
    return finish(recorder, metrics, state, output)


# ----------------------------------------------------------------------------------------------
# The comparison.
# ----------------------------------------------------------------------------------------------

# Metrics both sides log under TRL's names, with TRL's definitions (val/ratio_var: TRL's torch.var of a single
# micro-batch's mean is NaN, where the scripts log 0).
METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
           "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "val/ratio",
           "val/ratio_var", "val/num_eos_tokens", "lr", "episode")
PPO_METRICS = ("loss/value_avg", "val/clipfrac_avg")
# val/ratio_var is a variance of micro-batch means that agree to 1e-7 each: its relative difference is that rounding
# over the means' spread (1e-4 when they spread by 1e-3), so the table gives the absolute difference of its root.
RATIO_STD = "metric val/ratio_var: its square root, absolute difference"


def flatten(value):
    if isinstance(value, list):
        return [x for item in value for x in flatten(item)]
    return [value]


def relative_difference(ours, theirs, floor=1e-8):
    """||ours - theirs|| / max(||theirs||, floor) over the entries both define; None entries (padding, which the two
    sides fill differently) must sit at the same places. The floor keeps a quantity that is 0 up to rounding (the
    KL before any update, a ratio's variance) from dividing by its own rounding."""
    a, b = flatten(ours), flatten(theirs)
    if len(a) != len(b) or any((x is None) != (y is None) for x, y in zip(a, b)):
        return math.inf
    pairs = [(x, y) for x, y in zip(a, b) if x is not None]
    difference = math.sqrt(sum((x - y) ** 2 for x, y in pairs))
    scale = math.sqrt(sum(y * y for _, y in pairs))
    return difference / max(scale, floor)


def compare(ours, theirs, ours_weights=None, theirs_weights=None, initial=None):
    """Largest relative difference per quantity, over updates, micro-batches and optimizer steps."""
    table = {}

    def note(name, value):
        table[name] = max(table.get(name, 0.0), value)

    if len(ours["updates"]) != len(theirs["updates"]):
        return {"number of updates": math.inf}
    # The KL is a difference of two logprob sums of tens of nats: its rounding error is theirs, so it is measured
    # against the reference logprobs (one sum per completion for the per-completion quantities).
    logprob_sums = []
    for mine, trl in zip(ours["updates"], theirs["updates"]):
        sums = [sum(x for x in row if x is not None) for row in trl["tensors"]["ref_logprobs"]]
        logprob_sums.append(math.sqrt(sum(x * x for x in sums) / len(sums)))
        for name, value in trl["tensors"].items():
            if name == "kl":
                real = [x for x in flatten(trl["tensors"]["ref_logprobs"]) if x is not None]
                note("kl / |ref_logprobs|", relative_difference(mine["tensors"][name], value, math.hypot(*real)))
                # and against the KL itself, each completion's sum: a 1% error in the KL shows here
                note("kl, per-completion sums", relative_difference(*(
                    [sum(x for x in row if x is not None) for row in kl] for kl in (mine["tensors"][name], value))))
            elif name == "non_score_reward":
                note("non_score_reward / (kl_coef |sum ref_logprobs|)", relative_difference(
                    mine["tensors"][name], value, KL_COEF * math.hypot(*sums)))
            else:
                note(name, relative_difference(mine["tensors"][name], value))
    for key in ("losses", "steps"):
        if len(ours[key]) != len(theirs[key]):
            note(f"number of {key}", math.inf)
    for mine, trl in zip(ours["losses"], theirs["losses"]):
        # The policy loss is a mean of advantage-weighted ratios, and RLOO's advantages sum to 0 over a prompt's
        # completions, so at ratio 1 it is 0 up to rounding: it is measured against the mean |advantage| instead.
        note("loss (policy) / mean |advantage|, every micro-batch", abs(mine["policy"] - trl["policy"]) / trl["scale"])
        if "value" in trl:
            note("loss (value), every micro-batch", relative_difference(mine["value"], trl["value"]))
    for mine, trl in zip(ours["steps"], theirs["steps"]):
        note("gradient norm, every step", relative_difference(mine["norm"], trl["norm"]))
        note("gradient projection, every step", abs(mine["projection"] - trl["projection"]) / max(trl["norm"], 1e-12))
        note("gradient norm per tensor, every step", max(relative_difference(mine["per_tensor"].get(n, math.inf), v)
                                                          for n, v in trl["per_tensor"].items()))
    names = METRICS + (PPO_METRICS if "value" in (theirs["losses"] or [{}])[0] else ())
    for mine, trl, logprob_sum in zip(ours["metrics"], theirs["metrics"], logprob_sums):
        for name in names:
            value = trl[name]
            if name == "val/ratio_var" and math.isnan(value):
                value = 0.0
            if name == "loss/policy_avg":  # against the mean |advantage|, as the loss above
                scale = sum(loss["scale"] for loss in theirs["losses"]) / len(theirs["losses"])
                note("metric loss/policy_avg / mean |advantage|", abs(mine[name] - value) / scale)
            elif name in ("objective/kl", "objective/non_score_reward"):  # against the logprob sums, as above
                scale = logprob_sum * (KL_COEF if "non_score" in name else 1.0)
                note(f"metric {name} / |sum ref_logprobs|", abs(mine[name] - value) / scale)
            elif name == "val/ratio_var":  # a variance of means that each carry 1e-7 of rounding: compared as a std
                note(RATIO_STD, abs(math.sqrt(mine[name]) - math.sqrt(value)))
            else:
                note(f"metric {name}", relative_difference(mine[name], value))
    if len(ours["metrics"]) != len(theirs["metrics"]):
        note("number of logged updates", math.inf)
    if ours_weights is not None:
        difference = change = size = 0.0
        for name, start in initial.items():
            if name not in theirs_weights or name not in ours_weights:
                return {**table, f"final weights ({name} missing)": math.inf}
            difference += (ours_weights[name] - theirs_weights[name]).double().pow(2).sum().item()
            change += (theirs_weights[name].double() - start.double()).pow(2).sum().item()
            size += theirs_weights[name].double().pow(2).sum().item()
        # A step moves a weight by a small fraction of its size, so one fp32 rounding of a stored weight (one ulp,
        # where the two gradients differ in their last bits) is a visible fraction of that weight's change.
        note("final weights / their change", math.sqrt(difference / change) if change else math.inf)
        note("final weights / |weights|", math.sqrt(difference / size))
    return table


def initial_weights(world, script):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(world["paths"]["sft"])
    policy = {canonical(k): v for k, v in policy.named_parameters()}
    if script == "rloo":
        return {k: v.detach() for k, v in policy.items()}
    value = AutoModelForSequenceClassification.from_pretrained(world["paths"]["reward"], num_labels=1)
    return {**{f"policy.{k}": v.detach() for k, v in policy.items()},
            **{f"value_model.{k}": v.detach() for k, v in value.named_parameters()}}


def clip_fractions(result):
    return [m["policy/clipfrac_avg"] for m in result["metrics"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", help="python of the TRL 0.21 venv (the driver needs it)")
    parser.add_argument("--sizes", nargs="+", default=["small", "70m"], choices=list(SIZES))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmark", "results", "trl_parity_cpu"),
                        help="results prefix (.md and .json are added)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast on both sides (--dtype bf16; TRL's bf16=True), measured, not pinned")
    parser.add_argument("--write-fixture", action="store_true",
                        help="also write TRL's results for the small model to tests/fixtures/trl021_parity.json")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # one side, in its own venv
    parser.add_argument("--world", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--full-script", action="store_true", help=argparse.SUPPRESS)  # ours: rloo_full.py, ppo_full.py
    args = parser.parse_args(argv)
    if args.side:
        with open(os.path.join(args.world, "world.json")) as f:
            world = json.load(f)
        if args.side == "ours":
            run_ours(world, CASES[args.case], args.result, args.full_script, args.precision)
        else:
            run_trl(world, CASES[args.case], args.result, args.precision)
        return
    if not args.trl_python:
        parser.error("--trl-python is required (a venv with trl==0.21.0; see benchmark/trl_baseline.py)")
    import torch

    results, fixture = {}, {}
    with tempfile.TemporaryDirectory(prefix="trl-parity-") as scratch:
        for size in args.sizes:
            world = build_world(os.path.join(scratch, size), size)
            if args.precision == "bf16":
                results[f"{size}: bf16 log-softmax"] = bf16_log_softmax_error(world)
            for name in args.cases:
                case, sides = CASES[name], {}
                for side, python in (("trl", args.trl_python), ("ours", sys.executable)):
                    result = os.path.join(scratch, f"{size}-{side}-{list(CASES).index(name)}.json")
                    command = [python, os.path.abspath(__file__), "--side", side, "--world",
                               os.path.join(scratch, size), "--case", name, "--result", result,
                               "--precision", args.precision,
                               *(["--full-script"] if side == "ours" and "options" in case else [])]  # their flags
                    print(f"[{size}] {name}: {side} side", flush=True)
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"error: the {side} side of {name!r} ({size}) failed:\n{done.stderr[-4000:]}")
                    with open(result) as f:
                        sides[side] = json.load(f)
                    sides[side + "_weights"] = torch.load(result + ".weights.pt")
                table = compare(sides["ours"], sides["trl"], sides["ours_weights"], sides["trl_weights"],
                                initial_weights(world, case["script"]))
                results[f"{size}: {name}"] = {"max_relative_difference": table,
                                               "clipfrac_trl": clip_fractions(sides["trl"]),
                                               "clipfrac_ours": clip_fractions(sides["ours"]),
                                               "first_update": {side: {k: sides[side]["metrics"][0][k] for k in FIRST}
                                                                for side in ("trl", "ours")}}
                worst = max(table.values())
                print(f"    worst relative difference {worst:.2e} ({max(table, key=table.get)}); clip fraction "
                      f"per update {['%.3f' % c for c in clip_fractions(sides['trl'])]}", flush=True)
                if size == "small":
                    fixture["world"] = {k: world[k] for k in ("prompts", "completions", "stop_token_id", "checksum")}
                    fixture[name] = {k: sides["trl"][k] for k in ("updates", "steps", "losses", "metrics")}
    write_results(results, args)
    if args.write_fixture and args.precision == "fp32":
        path = os.path.join(ROOT, "tests", "fixtures", "trl021_parity.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"trl": "0.21.0", "command": "python benchmark/trl_parity.py --trl-python PATH --sizes small "
                       "--write-fixture", "world": fixture.pop("world"), "cases": fixture}, f)
        print(f"wrote {path}")


# At the first update the policy is the reference: in fp32 both sides' KL is exactly 0 and their ratio exactly 1.
FIRST = ("objective/kl", "val/ratio", "policy/approxkl_avg")


def bf16_log_softmax_error(world):
    """Per token, |log-softmax in bf16 - in fp32| of the same bf16 logits (the policy under autocast, the world's
    completions one at a time): what selective_log_softmax's bf16 branch adds where the logits are bf16 (TRL under
    DeepSpeed, whose models hold bf16 weights); the scripts' TokenLogprob works in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(world["paths"]["sft"])
    tokens, sums = [], []
    for cid, completion in world["completions"].items():
        ids = torch.tensor([world["prompts"][int(cid.split(",")[0])] + completion])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = policy(ids).logits[0, -RESPONSE_LENGTH - 1 : -1] / TEMPERATURE  # bf16, as TRL divides them
        index = torch.tensor(completion)[:, None]
        error = (logits.log_softmax(-1).gather(-1, index).float() - logits.float().log_softmax(-1).gather(-1, index))
        tokens.append(error.abs().flatten())
        sums.append(error.sum().abs())
    tokens = torch.cat(tokens)
    return {"logits dtype": str(logits.dtype), "per token, mean": tokens.mean().item(),
            "per token, max": tokens.max().item(), "per completion sum, mean": torch.stack(sums).mean().item()}


def write_results(results, args):
    softmax = {key: results.pop(key) for key in list(results) if key.endswith("bf16 log-softmax")}
    quantities = sorted({q for r in results.values() for q in r["max_relative_difference"]})
    lines = [f"Largest relative difference between rloo.py / ppo.py and TRL 0.21.0 on the same fixed batch "
             f"({args.precision}, CPU, one process, SGD; `python benchmark/trl_parity.py {' '.join(sys.argv[1:])}`). "
             "A cell is the largest ||ours - TRL|| / ||TRL|| over every update, micro-batch or optimizer step.", ""]
    for key, result in results.items():
        table = result["max_relative_difference"]
        first = result["first_update"]
        lines.append(f"**{key}**: worst {max(table.values()):.1e}; TRL's clip fraction per update "
                     f"{', '.join('%.3f' % c for c in result['clipfrac_trl'])}; update 1, TRL / ours: "
                     + ", ".join(f"{k} {first['trl'][k]:.3g} / {first['ours'][k]:.3g}" for k in FIRST))
    lines += ["", "| quantity | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for quantity in quantities:
        cells = [results[k]["max_relative_difference"].get(quantity) for k in results]
        lines.append(f"| {quantity} | " + " | ".join("" if c is None else f"{c:.1e}" for c in cells) + " |")
    lines += ["", *(f"{key}: " + ", ".join(f"{k} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in value.items()) for key, value in softmax.items())]
    results.update(softmax)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.output + ".json", "w") as f:
        json.dump({"command": sys.argv, "results": results}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
