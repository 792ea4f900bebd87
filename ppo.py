"""PPO for RLHF, in one file.

The policy samples one completion per prompt; every token is an action. Each token's reward is -kl_coef times its KL
to the frozen reference policy, and the reward model's score comes one step after the EOS token, in the state of the
finished completion. A value model (a 4th model, initialised from the reward model) estimates the return of every
prefix and of that state; advantages come from GAE, and the loss is PPO's clipped objective per token plus a clipped
value loss (Schulman et al. 2017; Ziegler et al. 2019; Huang et al. 2024, as TRL runs it: benchmark/trl_parity.py).

    python ppo.py                            # tiny offline TL;DR world (tiny_world.py), CPU, minutes
    python ppo.py --model pythia-1b          # Huang et al. 2024's TL;DR SFT and reward models (GPU, hub)
    python ppo.py --model pythia-1b --help   # every knob, with that preset's defaults
    accelerate launch --num_processes 8 ppo.py --model pythia-1b   # data parallel on 8 GPUs

ppo.py is the algorithm; ppo_full.py is ppo.py with insertions for long and large runs (resume, ZeRO-3, LoRA,
reward functions, a separate sampler, rollout correction, gradient checkpointing, non-finite guards, timings).
"""

import argparse
import collections
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import datasets
import transformers
import tyro
import accelerate.utils.other
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    # Experiment
    exp_name: str = "ppo"
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the run: model sampling, data order and minibatch order all follow from it"""
    output_dir: str = ""
    """where metrics.jsonl and the final policy go (default: runs/{exp_name}__{model}__{seed}__{time})"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without an account)"""
    wandb_project_name: str = "rlhf-reference"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""

    # Model and data
    model: Literal["tiny", "pythia-1b", "pythia-2.8b", "pythia-6.9b"] = "tiny"
    """preset: the tiny offline world, or the public Pythia TL;DR checkpoints of Huang et al. 2024"""
    sft_model_path: str = ""
    """SFT policy (hub name or local directory); the policy and the reference policy start from it"""
    reward_model_path: str = ""
    """reward model (sequence classification, one label; hub name or local directory)"""
    value_model_path: str = ""
    """initial value model (sequence classification, one label; default: the reward model, as Huang et al.)"""
    tokenizer_path: str = ""
    """tokenizer (hub name or local directory; default: the SFT model's)"""
    dataset_name: str = ""
    """prompt dataset (hub name or local directory, as load_dataset takes it)"""
    dataset_train_split: str = "train"
    """split of the dataset to train on"""
    prompt_column: str = "prompt"
    """column holding the raw prompt text (no chat template is applied)"""
    max_prompt_length: int = 512
    """prompts with more tokens are dropped"""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """compute precision (autocast); policy, value and reference keep fp32 weights, the reward model is stored in it"""

    # Sampling
    response_length: int = 53
    """most tokens sampled per completion"""
    temperature: float = 0.7
    """sampling temperature; logprobs are of the same tempered distribution"""
    stop_token: Optional[Literal["eos"]] = "eos"
    """end a completion at this token (None: always response_length tokens)"""
    missing_eos_penalty: Optional[float] = 1.0
    """subtracted from the score of completions without an EOS token (the EOS trick; None: off)"""

    # PPO
    kl_coef: float = 0.05
    """weight of the KL penalty to the reference policy in the reward"""
    cliprange: float = 0.2
    """PPO clip range of the per-token ratio"""
    cliprange_value: float = 0.2
    """clip range of the value prediction around its rollout-time value"""
    vf_coef: float = 0.1
    """weight of the value loss"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over the batch before GAE"""
    num_ppo_epochs: int = 4
    """passes of optimisation over each batch of completions"""
    num_mini_batches: int = 1
    """minibatches (optimizer steps) per epoch"""
    old_logprobs: Literal["forward", "generate"] = "forward"
    """the sampling policy's logprobs (KL penalty, ratio): a `forward` pass (the first minibatch's ratio is exactly 1)
    or the sampling pass's own (as TRL 0.11 takes generate()'s; under bf16 they differ: docs/bf16_ratio.md)"""

    # Optimisation
    total_episodes: int = 1_000_000
    """completions to train on in total"""
    learning_rate: float = 3e-6
    """AdamW learning rate, decayed linearly to 0"""
    per_device_train_batch_size: int = 16
    """completions per forward/backward pass, on each process"""
    gradient_accumulation_steps: int = 4
    """micro-batches per optimizer step"""
    local_rollout_forward_batch_size: int = 16
    """completions per generation / no-grad forward chunk"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""

    # Logging
    num_sample_generations: int = 10
    """how many times during training a table of sample completions is shown"""

    # Derived once from the above in check_args (not flags)
    world_size: tyro.conf.Suppress[int] = 1  # processes the run is spread over (data parallel, one per GPU)
    batch_size: tyro.conf.Suppress[int] = 0  # completions per update, over all processes
    local_batch_size: tyro.conf.Suppress[int] = 0  # completions per update on each process
    mini_batch_size: tyro.conf.Suppress[int] = 0  # completions per optimizer step, over all processes
    num_updates: tyro.conf.Suppress[int] = 0  # rollout + optimisation rounds


def pythia_preset(size: str, per_device_train_batch_size: int, gradient_accumulation_steps: int) -> Args:
    # Huang et al. 2024's public TL;DR checkpoints and PPO settings (kl_coef 0.05, lr 3e-6, 4 epochs x 1 minibatch,
    # 53 tokens, EOS trick, GAE gamma 1 lambda 0.95): 64 completions per update on each process, so 512 on the
    # recipe's 8 GPUs (benchmark/tldr.sh raises the accumulation to keep 512 on fewer).
    return Args(model=f"pythia-{size}", sft_model_path=f"cleanrl/EleutherAI_pythia-{size}-deduped__sft__tldr",
                reward_model_path=f"cleanrl/EleutherAI_pythia-{size}-deduped__reward__tldr",
                tokenizer_path=f"EleutherAI/pythia-{size}-deduped",
                dataset_name="trl-internal-testing/tldr-preference-sft-trl-style", dtype="bf16", learning_rate=3e-6,
                kl_coef=0.05, num_ppo_epochs=4, num_mini_batches=1,
                per_device_train_batch_size=per_device_train_batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps,
                local_rollout_forward_batch_size=per_device_train_batch_size, total_episodes=1_000_000)


PRESETS = {
    # Models and data come from tiny_world.py, built offline on first use and cached.
    "tiny": Args(model="tiny", max_prompt_length=64, response_length=16, learning_rate=1e-4,
                 kl_coef=0.05, num_ppo_epochs=4, num_mini_batches=1,
                 per_device_train_batch_size=64, gradient_accumulation_steps=1, local_rollout_forward_batch_size=64,
                 total_episodes=64 * 300),
    "pythia-1b": pythia_preset("1b", 16, 4),
    "pythia-2.8b": pythia_preset("2.8b", 8, 8),
    "pythia-6.9b": pythia_preset("6.9b", 4, 16),  # its training state needs ZeRO-3: ppo_full.py
}


# ---- The math, small and pure: what a reader checks against the paper and the tests pin to numbers ----


def compute_gae(rewards, values, gamma, lam):
    """Generalised advantage estimation over (B, T) tensors, the value after the last position taken as 0.
    Returns (advantages, returns = advantages + values). Padding is the caller's: zeros in, ignored out."""
    advantages = torch.zeros_like(rewards)
    next_advantage, next_value = 0.0, 0.0
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t], next_value = next_advantage, values[:, t]
    return advantages, advantages + values


def token_rewards(scores, kl, response_mask, kl_coef):
    """(B, R) per-token rewards: -kl_coef * KL on every real token, and the score one position after the last real
    token (its EOS), the state where the completion is finished, as TRL and Huang et al. credit it; a completion
    that fills all R positions (no EOS, or EOS in the last column) gets it on its last token."""
    rewards = -kl_coef * kl * response_mask
    after_last = response_mask.sum(1).clamp(max=rewards.shape[1] - 1)
    rewards[torch.arange(len(rewards), device=rewards.device), after_last] += scores
    return rewards


def value_positions(response_mask):
    """(B, R) where the value model is read and trained: every real token's state and the one after the last, where
    the score is credited (TRL's ~padding_mask_p1). Its value is the head read at the EOS token's hidden state."""
    return torch.nn.functional.pad(response_mask, (1, 0), value=True)[:, :-1]


def masked_whiten(values, mask, shift_mean=True):
    """Normalise to unit variance over the masked entries (and zero mean unless shift_mean is False)."""
    mean, var = values[mask].mean(), values[mask].var()
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean).masked_fill(~mask, 0.0)


def clipped_value_loss(new_values, old_values, returns, cliprange_value):
    """0.5 * mean of max((v - R)^2, (v_clipped - R)^2), v_clipped kept within cliprange_value of the
    rollout-time value. Returns (loss, clipfrac), clipfrac the fraction where the clipped term is larger."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    unclipped_loss, clipped_loss = (new_values - returns) ** 2, (clipped_values - returns) ** 2
    losses, clip_counts = 0.5 * torch.max(unclipped_loss, clipped_loss), (clipped_loss > unclipped_loss).float()
    # (no values when every completion of the micro-batch is unscored: 0, not the NaN of an empty mean)
    return (losses.mean(), clip_counts.mean()) if len(losses) else (losses.sum(), clip_counts.sum())


def ppo_clip_loss(logprobs, old_logprobs, advantages, cliprange):
    """PPO's clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)).
    Returns (loss, clipfrac), clipfrac being the fraction of samples whose gradient the clip zeroes."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    losses, clip_counts = torch.max(unclipped, clipped), (clipped > unclipped).float()
    # (no tokens when every completion of the micro-batch is unscored: 0, not the NaN of an empty mean)
    return (losses.mean(), clip_counts.mean()) if len(losses) else (losses.sum(), clip_counts.sum())


class TokenLogprob(torch.autograd.Function):
    """log softmax(logits / temperature) at the sampled tokens, in fp32, keeping no full-vocabulary log-softmax;
    backward builds one fp32 vocabulary-wide tensor where autograd builds five (~2x faster, less memory):
    d logprob / d logits = (onehot(token) - softmax(logits / temperature)) / temperature."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        tempered = logits.float() / temperature
        log_normalizer = tempered.logsumexp(-1)
        ctx.save_for_backward(logits, tokens, log_normalizer)
        ctx.temperature = temperature
        return tempered.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_normalizer

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        logits, tokens, log_normalizer = ctx.saved_tensors
        scale = grad.unsqueeze(-1) / ctx.temperature
        grad_logits = logits.to(torch.float32, copy=True).div_(ctx.temperature)
        grad_logits.sub_(log_normalizer.unsqueeze(-1)).exp_().mul_(-scale)
        return grad_logits.scatter_add_(-1, tokens.unsqueeze(-1), scale).to(logits.dtype), None, None


def forward(model, query_responses, attention_mask, **kwargs):
    # Queries are left-padded, so positions are counted over real tokens only. No KV cache: nothing follows.
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=query_responses, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 **kwargs)


class PolicyOutput(NamedTuple):
    """The training pass's (B, R) logprobs of the sampled tokens and their (B, R, V) untempered logits (for a term
    that needs the whole distribution: an entropy, a full KL)."""

    logprobs: torch.Tensor
    logits: torch.Tensor
    values: Optional[torch.Tensor] = None  # (B, R) the value model's (PolicyAndValue's pass)


def policy_forward(model, query_responses, attention_mask, context_length, temperature) -> PolicyOutput:
    """The pass over query + response; only positions predicting a response token go through the output layer."""
    predicting = torch.arange(context_length - 1, query_responses.shape[1] - 1, device=query_responses.device)
    logits = forward(model, query_responses, attention_mask, logits_to_keep=predicting).logits
    tokens, kept = query_responses[:, context_length:], logits
    return PolicyOutput(TokenLogprob.apply(kept, tokens, temperature), logits)


def sample(model, queries, pad_id, stop_id, max_tokens, temperature):
    """Samples up to max_tokens tokens after each left-padded query from softmax(logits / temperature), one forward
    per token over a KV cache, until every row has sampled stop_id (None: never stop early).
    Returns (B, max_tokens) tokens (pad_id after a row's stop token), the mask of the real ones (the stop token
    included; a sampled pad token is real too) and each token's logprob in this sampling pass."""
    batch, device = len(queries), queries.device
    tokens = torch.full((batch, max_tokens), pad_id, device=device)
    mask = torch.zeros(batch, max_tokens, dtype=torch.bool, device=device)
    logprobs = torch.zeros(batch, max_tokens, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    attention_mask = queries != pad_id
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    output = model(input_ids=queries, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1,
                   use_cache=True)
    for t in range(max_tokens):
        logits = output.logits[:, -1]
        # Inverse-CDF sampling: one uniform number per row. generate()'s torch.multinomial draws one per vocabulary
        # entry, a fifth of generation's time on a CPU. The sum runs in fp64 so that no real token falls outside it.
        tempered = logits.float() / temperature
        cdf = tempered.softmax(-1).double().cumsum(-1)
        uniform = torch.rand(batch, 1, dtype=torch.float64, device=device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, uniform, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
        mask[:, t] = ~ended
        tokens[:, t] = token.masked_fill(ended, pad_id)
        token_logprob = tempered.gather(-1, token.unsqueeze(-1)).squeeze(-1) - tempered.logsumexp(-1)
        logprobs[:, t] = token_logprob.masked_fill(ended, 0.0)
        if stop_id is not None:
            ended |= token == stop_id
        if ended.all() or t == max_tokens - 1:
            break
        attention_mask = torch.nn.functional.pad(attention_mask, (0, 1), value=True)
        position_ids = position_ids[:, -1:] + 1
        output = model(input_ids=tokens[:, t : t + 1], attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=output.past_key_values, use_cache=True)
    return tokens, mask, logprobs


def reward_scores(reward_model, query_responses, attention_mask, last_index):
    """(B,) reward model scores, read by its linear head at the last real token of query + response."""
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = forward(backbone, query_responses, attention_mask).last_hidden_state
    return reward_model.score(hidden[torch.arange(len(hidden)), last_index]).squeeze(-1).float()


def response_values(value_model, query_responses, attention_mask, context_length):
    """(B, R) value of each response token's state: the head read where the token is predicted from. The pass
    goes through the model's own forward; its last hidden state is the backbone's final one, which the score
    head reads at every position."""
    output = forward(value_model, query_responses, attention_mask, output_hidden_states=True)
    return value_model.score(output.hidden_states[-1][:, context_length - 1 : -1]).squeeze(-1).float()


class PolicyAndValue(torch.nn.Module):
    """The two trained models as one module, so that one optimizer, one gradient clip and one data-parallel engine
    serve both; its forward is the training pass of both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, query_responses, attention_mask, context_length, temperature) -> PolicyOutput:
        output = policy_forward(self.policy, query_responses, attention_mask, context_length, temperature)
        values = response_values(self.value_model, query_responses, attention_mask, context_length)
        return output._replace(values=values)


def prompt_batches(prompts, prompts_per_update, local_prompts, rank, pad_id, generator):
    """Endless left-padded prompt batches, reshuffled every epoch over the dataset; this process's slice of each."""
    while True:
        order = torch.randperm(len(prompts), generator=generator).tolist()
        for start in range(0, len(order) - prompts_per_update + 1, prompts_per_update):
            rows = order[start : start + prompts_per_update][rank * local_prompts : (rank + 1) * local_prompts]
            width = max(len(prompts[row]) for row in rows)
            yield torch.tensor([[pad_id] * (width - len(prompts[row])) + prompts[row] for row in rows])


def main(args: Args) -> None:
    accelerator = start_processes(args)
    rank, is_main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device
    run_name = check_output_dir(args, accelerator)

    # Sampling and minibatch order use the global generator, per process; the prompt order its own, shared by all.
    process_seed = args.seed + 100003 * rank  # so that seed s on process 1 is not seed s + 1 on process 0
    torch.manual_seed(process_seed)
    data_generator = torch.Generator().manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    temperature = args.temperature
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=args.dtype != "fp32")  # noqa: E731

    # Tokenizer: Pythia has no pad token; a distinct [PAD] keeps padding apart from EOS (Huang et al.).
    tokenizer = load_or_exit(lambda p: AutoTokenizer.from_pretrained(p, padding_side="left"),
                             args.tokenizer_path, "tokenizer", "--tokenizer-path")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        sys.exit("error: the tokenizer needs an EOS token and a pad token distinct from it; check --tokenizer-path")
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    stop_id = eos_id if args.stop_token == "eos" else None
    prompts = load_prompts(args, tokenizer, accelerator)

    # Models: the policy and reference in fp32 (so the KL is exactly 0 at first in every dtype), computing under
    # autocast; the reward model stored in the compute dtype; all in eval mode: dropout off, as Huang et al. require.
    policy, ref_policy, reward_model, value_model = load_models(args, dtype, device, tokenizer, prompts, pad_id)
    parameters = [*policy.parameters(), *value_model.parameters()]  # one optimizer, one loss: pg + vf_coef * vf
    # fused: one kernel for all the parameters (5.5x faster than the default foreach on this CPU, also on GPUs)
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, eps=1e-8, weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / args.num_updates)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")  # fp16 gradients underflow without it
    # DDP averages the gradients of what trains through policy_and_value; generation, no-grad passes: the plain models
    policy_and_value, optimizer = accelerator.prepare(PolicyAndValue(policy, value_model), optimizer)
    unwrapped_policy_and_value = accelerator.unwrap_model(policy_and_value)
    unwrapped_policy, unwrapped_value_model = unwrapped_policy_and_value.policy, unwrapped_policy_and_value.value_model

    metrics_file, wandb = open_logs(args, run_name, is_main)
    batches = prompt_batches(prompts, args.batch_size, args.local_batch_size, rank, pad_id, data_generator)
    local_mini_batch_size = args.mini_batch_size // args.world_size  # each process trains on its own completions
    start_time = time.time()
    for update in range(1, args.num_updates + 1):
        update_start = time.perf_counter()
        # 1. Generate: one completion per prompt.
        queries = next(batches).to(device)  # (B, Tq)
        context_length = queries.shape[1]
        chunks = []  # (responses, mask, logprobs, ref_logprobs, scores, values) of each chunk
        with torch.no_grad(), autocast():
            for i in range(0, len(queries), args.local_rollout_forward_batch_size):  # chunk_*: this chunk's rows
                chunk_queries = queries[i : i + args.local_rollout_forward_batch_size]
                chunk_responses, chunk_mask, sampled_logprobs = sample(
                    unwrapped_policy, chunk_queries, pad_id, stop_id, args.response_length, temperature)
                chunk_query_responses = torch.cat([chunk_queries, chunk_responses], 1)
                chunk_attention_mask = torch.cat([chunk_queries != pad_id, chunk_mask], 1)
                # 2. Logprobs of the sampled tokens under the reference and the policy (or the sampler's); values.
                chunk_ref_logprobs = policy_forward(ref_policy, chunk_query_responses, chunk_attention_mask,
                                                    context_length, temperature).logprobs
                chunk_logprobs, _, chunk_values = unwrapped_policy_and_value(
                    chunk_query_responses, chunk_attention_mask, context_length, temperature)
                chunk_logprobs = sampled_logprobs if args.old_logprobs == "generate" else chunk_logprobs
                # 3. Score: the reward model reads the last real token.
                last_index = context_length + chunk_mask.sum(1) - 1
                chunk_scores = reward_scores(reward_model, chunk_query_responses, chunk_attention_mask, last_index)
                chunks.append((chunk_responses, chunk_mask, chunk_logprobs, chunk_ref_logprobs, chunk_scores,
                               chunk_values))
        # The whole batch: each token's KL to the reference, the EOS trick on the scores, the training passes' inputs.
        responses, response_mask, logprobs, ref_logprobs, scores, values = map(torch.cat, zip(*chunks))  # (B, R), (B,)
        logprobs, ref_logprobs = (x.masked_fill(~response_mask, 0.0) for x in (logprobs, ref_logprobs))
        kl = logprobs - ref_logprobs  # (B, R): each token's k1 KL to the reference, zero after the stop token
        if args.missing_eos_penalty is not None:  # the EOS trick: a completion that never ended loses this much score
            scores = torch.where((responses == eos_id).any(1), scores, scores - args.missing_eos_penalty)
        query_responses = torch.cat([queries, responses], 1)
        attention_masks = torch.cat([queries != pad_id, response_mask], 1)
        loss_mask, value_mask = response_mask, value_positions(response_mask)
        values = values.masked_fill(~value_mask, 0.0)

        # 4. KL-penalised reward: every token an action rewarded -kl_coef x its KL; the score one step after the EOS.
        rewards = token_rewards(scores, kl, response_mask, args.kl_coef)  # (rlhf_reward below: for the log)
        non_score_reward = -args.kl_coef * kl.sum(1)
        rlhf_reward = scores + non_score_reward

        # 5. Advantages: GAE, then whitened over this process's tokens (Huang et al. 2024, as TRL does).
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, value_mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, values, args.gamma, args.lam)
        advantages = masked_whiten(advantages, loss_mask)

        # 6. Loss: PPO-clip per token plus the clipped value loss, over epochs x minibatches x micro-batches.
        stats = collections.defaultdict(list)  # logged as the mean over the update, each under its name
        first_minibatch = []  # (new, old logprobs, mask) of each micro-batch, for the ratio diagnostics
        for epoch in range(args.num_ppo_epochs):
            order = torch.randperm(args.local_batch_size, device=device)
            for mb_start in range(0, args.local_batch_size, local_mini_batch_size):
                for micro_start in range(mb_start, mb_start + local_mini_batch_size, args.per_device_train_batch_size):
                    idx = order[micro_start : micro_start + args.per_device_train_batch_size]
                    with autocast(), accelerator.accumulate(policy_and_value):  # (DDP averages at the last micro-batch)
                        output = policy_and_value(query_responses[idx], attention_masks[idx], context_length,
                                                  temperature)  # everything the loss below may use
                    new_logprobs, new_values = output.logprobs.masked_fill(~response_mask[idx], 0.0), output.values
                    old_logprobs = logprobs[idx]
                    if epoch == 0 and mb_start == 0 and args.old_logprobs == "forward":
                        old_logprobs = new_logprobs.detach()  # no step yet: the sampling weights, ratio exactly 1
                    mask, vmask = loss_mask[idx], value_mask[idx]
                    loss, clipfrac = ppo_clip_loss(new_logprobs[mask], old_logprobs[mask], advantages[idx][mask],
                                                   args.cliprange)
                    vf_loss, vf_clipfrac = clipped_value_loss(new_values[vmask], values[idx][vmask],
                                                              returns[idx][vmask], args.cliprange_value)

                    with torch.no_grad():  # TRL's statistics: over all (b, R) positions, padding's log-ratio being 0
                        stats["policy/approxkl_avg"].append(0.5 * ((new_logprobs - old_logprobs) ** 2).mean())
                        stats["policy/clipfrac_avg"].append(clipfrac)
                        stats["loss/policy_avg"].append(loss.detach())
                        stats["val/ratio"].append((new_logprobs - old_logprobs).exp().mean())
                        stats["loss/value_avg"].append(vf_loss.detach())
                        stats["val/clipfrac_avg"].append(vf_clipfrac)
                        if epoch == 0 and mb_start == 0:
                            first_minibatch.append((new_logprobs.detach(), old_logprobs, response_mask[idx].long()))
                    accelerator.backward(scaler.scale(loss + args.vf_coef * vf_loss))  # divides by accumulation
                # The minibatch's step: the gradient clipped over all processes, then AdamW (fp16: through the scaler)
                scaler.unscale_(optimizer)
                grad_norm = accelerator.clip_grad_norm_(parameters, args.max_grad_norm)  # the norm before clipping
                stats["grad_norm"].append(torch.as_tensor(grad_norm, dtype=torch.float32, device=device))
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

        # 7. Log: one dict per update, to the console, metrics.jsonl and wandb.
        metrics = {
            **update_metrics(accelerator, stats, first_minibatch, args.cliprange, kl=kl, logprobs=logprobs,
                             response_mask=response_mask.long(), non_score_reward=non_score_reward,
                             rlhf_reward=rlhf_reward, scores=scores, returns=returns, values=values,
                             value_mask=value_mask.long()),
            "val/num_eos_tokens": (responses == eos_id).sum().item(),  # this process's, as TRL logs it
            "lr": scheduler.get_last_lr()[0], "episode": update * args.batch_size,
            "eps": update * args.batch_size / (time.time() - start_time),
            "time/update": time.perf_counter() - update_start,
        }
        if is_main:
            report(args, update, metrics, tokenizer, (queries, responses, response_mask, scores), metrics_file, wandb)
        scheduler.step()  # after logging: `lr` is the rate this update trained with, as TRL logs it

    # Every process takes part in collecting the weights (a no-op without sharding); the main one writes them.
    state_dict = accelerator.get_state_dict(policy_and_value)
    if is_main:
        metrics_file.close()
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa
        unwrapped_policy.save_pretrained(args.output_dir, state_dict=part("policy."))
        tokenizer.save_pretrained(args.output_dir)
        unwrapped_value_model.save_pretrained(os.path.join(args.output_dir, "value_model"),
                                              state_dict=part("value_model."))
        print(f"saved the policy and tokenizer to {args.output_dir}, the value model to its value_model/")
        if args.track:
            wandb.finish()
    accelerator.wait_for_everyone()  # no process exits while another still needs it


# ---- Plumbing: flags, processes, loading, logging ----

# The flags, and the preset, that only ppo_full.py has
FULL_ONLY = set("""save-every keep-checkpoints resume overwrite resume-anyway reward-fn reward-model-weight
    reward-fn-weight sampler-dtype sampler-sync-every top-p top-p-logprobs rollout-correction rollout-correction-cap
    gradient-checkpointing lora-r lora-alpha lora-dropout lora-target-modules merge-lora-on-save
    train-on-rollout-forward pythia-6.9b stop-token-id kl-estimator""".split())


def parse_args(argv=None) -> Args:
    # --model picks the preset whose values become the defaults: `--model X --help` shows X's settings.
    argv = sys.argv[1:] if argv is None else argv
    asked = [word for word in argv if {word.split("=")[-1], word.split("=")[0][2:].removeprefix("no-")} & FULL_ONLY]
    if asked:
        sys.exit(f"error: {asked[0]} is in ppo_full.py, not in the core ppo.py: run ppo_full.py with the same flags")
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model", default="tiny")
    name = peek.parse_known_args(argv)[0].model
    if name not in PRESETS:
        sys.exit(f"error: unknown --model {name!r}; choose one of {', '.join(PRESETS)}")
    return tyro.cli(Args, default=PRESETS[name], args=argv, description=__doc__)


def check_args(args: Args) -> None:
    """Refuse settings that cannot work, each with a one-line reason, before any of them reaches arithmetic; then
    derive the batch sizes once."""
    at_least_one = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_mini_batches", "num_ppo_epochs",
                    "local_rollout_forward_batch_size", "response_length", "max_prompt_length", "total_episodes")
    problems = [
        *((getattr(args, name) < 1, f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
          for name in at_least_one),
        (not args.temperature > 0, f"--temperature must be > 0 (got {args.temperature})"),
        (not args.learning_rate >= 0, f"--learning-rate must be >= 0 (got {args.learning_rate})"),
        (not args.max_grad_norm > 0, f"--max-grad-norm must be > 0 (got {args.max_grad_norm})"),
        (not args.kl_coef >= 0, f"--kl-coef must be >= 0 (got {args.kl_coef})"),
        (not min(args.cliprange, args.cliprange_value) > 0, "--cliprange and --cliprange-value must be > 0"),
        (not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1), "--gamma and --lam must be within [0, 1]"),
        (not args.vf_coef >= 0, f"--vf-coef must be >= 0 (got {args.vf_coef})"),
    ]
    for failed, message in problems:
        if failed:
            sys.exit(f"error: {message}")
    args.mini_batch_size = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    args.batch_size = args.mini_batch_size * args.num_mini_batches
    args.local_batch_size = args.batch_size // args.world_size
    # Rounded up, as TRL's num_total_batches: at least --total-episodes completions (and the LR decays over them)
    args.num_updates = -(-args.total_episodes // args.batch_size)


def start_processes(args: Args):
    """One process per GPU under `accelerate launch` (`python ppo.py`: one); the tiny world's paths filled in."""
    datasets.disable_progress_bars()  # one line per update is the progress display
    transformers.utils.logging.disable_progress_bar()
    # Precision is --dtype's alone (autocast), whatever an accelerate config says; a GPU or else the CPU.
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision="no",
                              cpu=not torch.cuda.is_available())
    if accelerator.distributed_type.name not in ("NO", "MULTI_GPU", "MULTI_CPU"):
        sys.exit(f"error: {accelerator.distributed_type.name} is not supported by ppo.py (data parallel only); "
                 "DeepSpeed ZeRO runs in ppo_full.py")
    args.world_size = accelerator.num_processes
    accelerate.utils.other.is_deepspeed_available = lambda: False  # (else unwrapping imports DeepSpeed: it warns)
    if args.model == "tiny" and not (args.sft_model_path and args.reward_model_path and args.dataset_name):
        import tiny_world  # the tiny preset builds its models and data locally instead of downloading them

        with accelerator.main_process_first():  # one process builds, the others load
            world = tiny_world.ensure_world()
        args.sft_model_path = args.sft_model_path or world["sft_model_path"]
        args.reward_model_path = args.reward_model_path or world["reward_model_path"]
        args.dataset_name = args.dataset_name or world["dataset_name"]
    for flag in ("sft_model_path", "reward_model_path", "dataset_name"):
        if not getattr(args, flag):
            sys.exit(f"error: --{flag.replace('_', '-')} is required for --model {args.model}")
    args.tokenizer_path = args.tokenizer_path or args.sft_model_path
    args.value_model_path = args.value_model_path or args.reward_model_path
    check_args(args)
    return accelerator


def check_output_dir(args: Args, accelerator):
    """The run's name; its directory is checked before anything is loaded or written, never to lose a run's results."""
    run_name = broadcast_object_list([f"{args.exp_name}__{args.model}__{args.seed}__{int(time.time())}"])[0]
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        sys.exit(f"error: --output-dir {args.output_dir!r} is a file; choose a directory")
    found = set(os.listdir(args.output_dir)) if os.path.isdir(args.output_dir) else set()
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")  # a run that stopped before its first update
    unstarted = "args.json" in found and not (os.path.exists(metrics_path) and os.path.getsize(metrics_path)) and (
        found <= {"args.json", "metrics.jsonl", "wandb", "wandb_id"})  # has nothing to lose: it may start again
    if found and not unstarted:
        sys.exit(f"error: --output-dir {args.output_dir!r} is not empty; choose another directory (ppo_full.py "
                 "--resume continues a run in it, --overwrite replaces it)")
    accelerator.wait_for_everyone()  # every process has checked before the main one writes anything
    return run_name


def load_or_exit(load, path, what, flag):
    """load(path), or a one-line error naming the flag to fix; with loading info, every weight must have been loaded
    (a causal LM passed as a reward model would otherwise get a random head, silently)."""
    try:
        model = load(path)
    except Exception as error:  # noqa: BLE001 (whatever the loader raises, the path given is what to check)
        sys.exit(f"error: cannot load the {what} from {path!r} ({type(error).__name__}: "
                 f"{(str(error).splitlines() or [''])[0]}); check {flag}")
    if isinstance(model, tuple):
        model, loading = model
        if loading["missing_keys"]:
            sys.exit(f"error: the {what} at {path!r} has no trained {', '.join(sorted(loading['missing_keys'])[:3])} "
                     f"(is it a sequence-classification model with one label?); check {flag}")
    return model


def load_prompts(args: Args, tokenizer, accelerator):
    """Every prompt tokenized once, without special tokens; empty ones and those over --max-prompt-length dropped."""
    dataset = load_or_exit(lambda p: load_dataset(p, split=args.dataset_train_split), args.dataset_name,
                           "dataset", "--dataset-name and --dataset-train-split")
    if args.prompt_column not in dataset.column_names:
        sys.exit(f"error: the dataset has no column {args.prompt_column!r} (it has {dataset.column_names}); "
                 "set --prompt-column")
    texts = dataset[args.prompt_column]
    tokenized = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    kept = [row for row, ids in enumerate(tokenized) if 0 < len(ids) <= args.max_prompt_length]
    prompts = [tokenized[row] for row in kept]
    if len(prompts) < len(dataset):
        accelerator.print(f"dropped {len(dataset) - len(prompts)} of {len(dataset)} prompts: empty or longer than "
                          f"--max-prompt-length {args.max_prompt_length}")
    if len(prompts) < args.batch_size:
        sys.exit(f"error: only {len(prompts)} prompts fit --max-prompt-length {args.max_prompt_length}; "
                 f"an update needs {args.batch_size}")
    return prompts


def load_models(args: Args, dtype, device, tokenizer, prompts, pad_id):
    """The policy, the reference, the reward and the value model, checked against the tokenizer and the prompts."""
    policy = load_or_exit(lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32),
                          args.sft_model_path, "SFT policy", "--sft-model-path").eval()
    ref_policy = load_or_exit(lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32),
                              args.sft_model_path, "SFT policy", "--sft-model-path")
    ref_policy = ref_policy.requires_grad_(False).to(device).eval()
    reward_model = load_or_exit(
        lambda p: AutoModelForSequenceClassification.from_pretrained(p, dtype=dtype, num_labels=1,
                                                                     output_loading_info=True),
        args.reward_model_path, "reward model", "--reward-model-path")
    reward_model = reward_model.requires_grad_(False).to(device).eval()
    value_model = load_or_exit(
        lambda p: AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32, num_labels=1,
                                                                     output_loading_info=True),
        args.value_model_path, "value model", "--value-model-path").eval()
    value_model.config.pad_token_id = pad_id  # its forward pools at the last non-pad token (unused here, but needed)
    positions, longest = getattr(policy.config, "max_position_embeddings", None), max(map(len, prompts))
    if positions and longest + args.response_length > positions:
        sys.exit(f"error: the longest prompt ({longest} tokens) + --response-length {args.response_length} exceed the "
                 f"policy's {positions} positions; lower --max-prompt-length or --response-length")
    for model, flag in ((policy, "--sft-model-path"), (reward_model, "--reward-model-path"),
                        (value_model, "--value-model-path")):
        embeddings = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > embeddings:  # a token id past the table fails only mid-rollout (on a GPU, an assert)
            sys.exit(f"error: the tokenizer has {len(tokenizer)} tokens, more than the {embeddings} embeddings of the "
                     f"model at {flag}; use a tokenizer and models that match")
    return policy, ref_policy, reward_model, value_model


def open_logs(args: Args, run_name, is_main):
    """args.json, metrics.jsonl and wandb (--track), on the main process: (metrics file, wandb module) or None."""
    if not is_main:  # only the main process logs and saves
        return None, None
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump({**dataclasses.asdict(args), "script": os.path.basename(__file__)}, f, indent=2)
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a")
    if not args.track:
        return metrics_file, None
    import wandb

    wandb_kwargs = dict(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                        config=dataclasses.asdict(args), dir=args.output_dir)
    wandb.init(**wandb_kwargs)
    return metrics_file, wandb


def ratio_diagnostics(new_logprobs, old_logprobs, mask, cliprange):
    """The first minibatch's ratio, before any step: exactly 1 with --old-logprobs forward (by construction); with
    generate, anything else is numerical mismatch (bf16, KV cache, batch shape). clipfrac: outside [1 - c, 1 + c]."""
    token_ratio = torch.exp(new_logprobs - old_logprobs)[mask]
    seq_ratio = torch.exp(((new_logprobs - old_logprobs) * mask).sum(1))
    stats = {}
    for name, ratio in (("token", token_ratio), ("seq", seq_ratio)):
        stats.update({f"diag/ratio_{name}_mean": ratio.mean().item(), f"diag/ratio_{name}_std": ratio.std().item(),
                      f"diag/ratio_{name}_min": ratio.min().item(), f"diag/ratio_{name}_max": ratio.max().item(),
                      f"diag/clipfrac_{name}": ((ratio - 1).abs() > cliprange).float().mean().item()})
    return stats


def update_metrics(accelerator, stats, first_minibatch, cliprange, **completions):
    """TRL's metrics of one update, with TRL's names and definitions, over every process's completions (gathered in
    process order). Each list in `stats` is logged as its mean under its own name: a fork's statistic is logged too."""
    g = {name: accelerator.gather(tensor) for name, tensor in completions.items()}
    stats = {name: accelerator.gather(torch.stack(values)) for name, values in stats.items()}
    new, old, mask = (accelerator.gather(torch.cat(tensors)) for tensors in zip(*first_minibatch))
    returns, values, valid = g["returns"], g["values"], g["value_mask"].bool()
    return {
        "objective/kl": g["kl"].sum(1).mean().item(),
        # TRL's: each padding position counts -1 (TRL fills their logprobs with 1.0); entropy_no_padding: 0
        "objective/entropy": (-g["logprobs"].sum(1) - (g["response_mask"] == 0).sum(1)).mean().item(),
        "objective/entropy_no_padding": -g["logprobs"].sum(1).mean().item(),
        "objective/non_score_reward": g["non_score_reward"].mean().item(),
        "objective/rlhf_reward": g["rlhf_reward"].mean().item(),
        "objective/scores": g["scores"].mean().item(),
        **{name: per_step.mean().item() for name, per_step in stats.items()},
        "val/explained_variance": (1 - (returns - values)[valid].var() / returns[valid].var()).item(),
        # (of a single micro-batch: 0, where TRL's var() gives NaN)
        "val/ratio_var": stats["val/ratio"].var().item() if len(stats["val/ratio"]) > 1 else 0.0,
        **ratio_diagnostics(new, old, mask.bool(), cliprange),
    }


def report(args: Args, update, metrics, tokenizer, completions, metrics_file, wandb):
    """One update's metrics to metrics.jsonl, the console and wandb; --num-sample-generations times in the run, also
    the first 4 completions (the prompt's end, the completion, its score)."""
    metrics_file.write(json.dumps({"update": update, **metrics}) + "\n")
    metrics_file.flush()
    print(f"update {update}/{args.num_updates}  episode {metrics['episode']}  "
          f"scores {metrics['objective/scores']:+.3f}  rlhf_reward {metrics['objective/rlhf_reward']:+.3f}  "
          f"kl {metrics['objective/kl']:.3f}  clipfrac {metrics['policy/clipfrac_avg']:.3f}  "
          f"{metrics['time/update']:.2f}s", flush=True)
    every, samples = max(1, args.num_updates // max(1, args.num_sample_generations)), []
    if update == 1 or update % every == 0 or update == args.num_updates:
        queries, responses, response_mask, scores = completions
        samples = [(tokenizer.decode(queries[i], skip_special_tokens=True)[-60:], tokenizer.decode(
            responses[i][response_mask[i]]), round(scores[i].item(), 3)) for i in range(min(4, len(queries)))]
    for query_text, response_text, score in samples:
        print(f"    {score:+7.3f} | ...{query_text!r} -> {response_text!r}")
    if wandb:
        if samples:
            metrics["samples"] = wandb.Table(columns=["query", "response", "score"], data=samples)
        wandb.log(metrics, step=update)


if __name__ == "__main__":  # a foreseeable mistake exits with one line; a bug keeps its traceback, to show its line
    main(parse_args())
