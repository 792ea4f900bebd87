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
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import json
import math
import numbers
import os
import random
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import numpy as np
import torch
import datasets
import transformers
import tyro
import accelerate.utils.other
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class Args:
    # Experiment
    exp_name: str = "ppo"
    """name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the run: model sampling, data order and minibatch order all follow from it"""
    output_dir: str = ""
    """where metrics.jsonl and the final policy go (default: runs/{exp_name}__{model}__{seed}__{time})"""
    save_every: int = 100
    """save a checkpoint (weights, optimizer, scheduler, every process's RNG states) to OUTPUT_DIR/checkpoints every
    this many updates; one is also saved at the end and when SIGINT or SIGTERM stops the run"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep"""
    resume: bool = False
    """continue the run in --output-dir from its newest checkpoint, with the same flags (a fresh start if it has
    none)"""
    overwrite: bool = False
    """replace the run in --output-dir (without it or --resume, a directory holding a run is never touched)"""
    resume_anyway: bool = False
    """with --resume: continue a run that another script, or an earlier version of this one, made (the run then
    goes on with this code; args.json keeps the record of which script ran which updates)"""
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
    reward_fn: str = ""
    """a Python reward function, `module:function` (importable from this script's directory or PYTHONPATH) or
    `path/to/file.py:function`, e.g. tiny_world:gold_reward; see docs/reward_functions.md. With a reward model too,
    the score is the weighted sum of the two; with --reward-model-path none, the function alone gives the score"""
    reward_model_weight: float = 1.0
    """weight of the reward model's score in the score"""
    reward_fn_weight: float = 1.0
    """weight of --reward-fn's score in the score"""
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
    stop_token_id: Optional[int] = None
    """end a completion at this token id instead (TRL's option; it needs --stop-token None). The EOS trick still
    looks for the EOS token"""
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
    kl_estimator: Literal["k1", "k3"] = "k1"
    """the per-token KL in the reward, of r = p_ref / p at the sampled token: k1 = -log r, or k3 = (r - 1) - log r
    (Schulman's estimators, as TRL's PPOTrainer option: both unbiased, k3 never negative and usually of lower
    variance)"""
    num_ppo_epochs: int = 4
    """passes of optimisation over each batch of completions"""
    num_mini_batches: int = 1
    """minibatches (optimizer steps) per epoch"""
    old_logprobs: Literal["forward", "generate"] = "forward"
    """the sampling policy's logprobs (KL penalty, ratio): a `forward` pass (the first minibatch's ratio is exactly 1)
    or the sampling pass's own (as TRL 0.11 takes generate()'s; under bf16 they differ: docs/bf16_ratio.md)"""

    # When the sampler is not the learner (docs/sampler_vs_learner.md): a sampler copy, and rollout correction
    sampler_dtype: Literal["same", "fp32", "bf16", "fp16"] = "same"
    """`same`: the policy itself samples (no copy). Otherwise a copy of the policy samples, its weights stored in
    this dtype as an inference engine holds them (it computes in that dtype too); --old-logprobs generate then
    takes the sampler's logprobs"""
    sampler_sync_every: int = 1
    """the sampler copy takes the policy's weights every this many updates, so its samples are up to N-1 updates
    stale (1: every update; above 1 a copy is made even with --sampler-dtype same)"""
    top_p: float = 1.0
    """the sampler draws from the smallest set of most probable tokens holding this share of the probability"""
    top_p_logprobs: Literal["full", "renormalized"] = "full"
    """with --top-p below 1, the learner's and the reference's logprobs are of the full softmax (the default, as
    TRL's trainers compute them: the ratio to the sampler then carries the kept mass) or renormalised over the tokens
    their own top-p filter keeps, and the sampled token (as TRL PR #7269 does)"""
    rollout_correction: Literal["none", "token-tis", "seq-tis", "seq-mis"] = "none"
    """weight each loss term by the old policy's learner-over-sampler probability ratio: truncated at the cap per
    token (token-tis, Yao et al. 2025) or per completion (seq-tis), or 0 above the cap (seq-mis, Liu et al. 2025)"""
    rollout_correction_cap: float = 2.0
    """the cap of --rollout-correction (verl's default threshold, for token and sequence alike)"""

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
    gradient_checkpointing: bool = False
    """recompute each layer's activations in backward instead of keeping them (less memory, about a third more
    compute in training)"""
    train_on_rollout_forward: bool = True
    """with one micro-batch per step, one step per epoch and one rollout chunk (the tiny preset), the rollout's
    policy pass runs with autograd and the first epoch trains on it: one forward fewer per update, the same
    computation (False: a separate training forward, as ppo.py does)"""

    # LoRA (docs/lora.md)
    lora_r: int = 0
    """rank of the LoRA adapters (0: full fine-tuning). With LoRA only the adapters train, and the reference policy
    is the policy with its adapters switched off: one copy of the SFT weights (fp32, as the policy's), not two"""
    lora_alpha: Optional[float] = None
    """the adapters' output is scaled by lora_alpha / lora_r (default: 2 x lora_r, a scale of 2)"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input; above 0 it acts in every pass of the policy (sampling too), so two passes of
    the same weights disagree and the first minibatch's ratio is no longer 1"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """the layers that get adapters, by name (`all-linear`: every linear layer but the output layer, in GPT-NeoX
    and Llama-style models alike)"""
    merge_lora_on_save: bool = False
    """also save the policy with its adapters merged into its weights, to OUTPUT_DIR/merged (loads without peft)"""

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


def rollout_weights(log_ratio, mask, mode, cap):
    """Rollout correction (verl's; TIS: Yao et al. 2025; MIS: Liu et al. 2025). log_ratio is, per token, the log of
    the old policy's probability under the learner over the sampler's. Returns (B, R) tensors, one entry per loss
    term (a token): the term's ratio (the token's; with seq-* its completion's, the product of its token ratios),
    the weight the loss uses (1 with none; the ratio truncated at cap with token-tis and seq-tis; 0 above cap with
    seq-mis), and whether the correction truncated or masked it."""
    log_ratio = log_ratio.masked_fill(~mask, 0.0)
    if mode in ("none", "token-tis"):
        ratio = log_ratio.exp()
    else:
        ratio = log_ratio.sum(1, keepdim=True).exp().expand_as(log_ratio).contiguous()
    over = (ratio > cap) & mask
    weight = {"none": torch.ones_like(ratio), "token-tis": ratio.clamp(max=cap), "seq-tis": ratio.clamp(max=cap),
              "seq-mis": ratio.masked_fill(over, 0.0)}[mode]
    return ratio, weight, over & (mode != "none")


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


def outside_top_p(tempered_logits, top_p):
    """True at the tokens outside the nucleus, the smallest set of most probable tokens whose probability reaches
    top_p (Holtzman et al. 2020)."""
    probs, order = tempered_logits.softmax(-1).sort(-1, descending=True)
    outside = probs.cumsum(-1) - probs >= top_p  # the more probable tokens hold top_p already
    return outside.scatter(-1, order, outside)


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


def policy_forward(model, query_responses, attention_mask, context_length, temperature, top_p=1.0) -> PolicyOutput:
    """The pass over query + response; only positions predicting a response token go through the output layer."""
    predicting = torch.arange(context_length - 1, query_responses.shape[1] - 1, device=query_responses.device)
    logits = forward(model, query_responses, attention_mask, logits_to_keep=predicting).logits
    tokens, kept = query_responses[:, context_length:], logits
    if top_p < 1.0:  # the logprobs renormalised over the model's own nucleus and the sampled token
        outside = outside_top_p(logits.float() / temperature, top_p).scatter_(-1, tokens.unsqueeze(-1), False)
        kept = logits.masked_fill(outside, float("-inf"))
    return PolicyOutput(TokenLogprob.apply(kept, tokens, temperature), logits)


def response_logprobs(model, query_responses, attention_mask, context_length, temperature, top_p=1.0):
    """(B, R) logprobs of the response tokens, for the passes that train nothing (reference, rollout)."""
    return policy_forward(model, query_responses, attention_mask, context_length, temperature, top_p).logprobs


def sample(model, queries, pad_id, stop_id, max_tokens, temperature, top_p=1.0):
    """Samples up to max_tokens tokens after each left-padded query from softmax(logits / temperature), one forward
    per token over a KV cache, until every row has sampled stop_id (None: never stop early).
    With top_p below 1, it samples within the top_p nucleus.
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
        if top_p < 1.0:
            tempered = tempered.masked_fill(outside_top_p(tempered, top_p), float("-inf"))
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


def checkpoint_layers(model):
    """Gradient checkpointing: in a forward with autograd each transformer layer keeps only its inputs, and backward
    runs it again. (Not transformers' own switch: that acts only in training mode, which turns dropout on, and it
    drops the KV cache that sampling needs.)"""
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer.forward = lambda *args, plain=layer.forward, **kwargs: (
                torch.utils.checkpoint.checkpoint(plain, *args, use_reentrant=False, **kwargs)
                if torch.is_grad_enabled() else plain(*args, **kwargs))


def with_lora(policy, args: Args):
    """LoRA (Hu et al. 2021), with peft: the policy's weights frozen, trained low-rank adapters beside the
    --lora-target-modules layers. An adapter's B starts at 0, so until the first step the adapted policy IS the SFT
    policy. The reference policy is the same model with its adapters switched off (as TRL 0.21's PPOTrainer's
    null_ref_context): one copy of the weights where full fine-tuning holds two. Returns (policy, reference)."""
    try:
        import peft
    except ImportError:
        sys.exit("error: --lora-r needs peft: pip install peft")
    modules = args.lora_target_modules
    config = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r, task_type="CAUSAL_LM",
                             lora_dropout=args.lora_dropout,
                             target_modules=modules[0] if modules == ("all-linear",) else list(modules))
    try:
        policy = peft.get_peft_model(policy, config)
    except ValueError as error:  # no layer has those names
        sys.exit(f"error: --lora-target-modules {' '.join(modules)}: {str(error).splitlines()[0]}")
    if os.path.isdir(args.sft_model_path):  # the saved adapters name their base: a local one by its absolute path
        policy.peft_config["default"].base_model_name_or_path = os.path.abspath(args.sft_model_path)
    for name, module in policy.named_modules():
        if name.endswith("lora_dropout"):
            module.train()  # every model stays in eval mode, which would switch --lora-dropout off

    def reference(*inputs, **kwargs):
        with policy.disable_adapter():
            return policy(*inputs, **kwargs)

    return policy, reference


def reward_scores(reward_model, query_responses, attention_mask, last_index):
    """(B,) reward model scores, read by its linear head at the last real token of query + response."""
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    hidden = forward(backbone, query_responses, attention_mask).last_hidden_state
    return reward_model.score(hidden[torch.arange(len(hidden)), last_index]).squeeze(-1).float()


def load_reward_fn(spec):
    """The function --reward-fn names: `module:function` (a module importable from the script's directory or
    PYTHONPATH) or `path/to/file.py:function`. An exception raised while that module is imported is a bug in it,
    and keeps its traceback."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        sys.exit(f"error: --reward-fn {spec!r} is not module:function or path/to/file.py:function")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            sys.exit(f"error: --reward-fn {spec!r}: there is no file {module_name!r}")
        location = importlib.util.spec_from_file_location(os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(location)
        location.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if not (module_name + ".").startswith(f"{error.name}."):  # a module that the named one imports
                raise
            sys.exit(f"error: --reward-fn {spec!r}: no module {module_name!r} on the path (give a file's path instead: "
                     "path/to/file.py:function)")
    function = getattr(module, name, None)
    if not callable(function):
        sys.exit(f"error: --reward-fn {spec!r}: {module_name} has no function {name!r}")
    return function


def function_scores(reward_fn, prompts, completions, completion_ids, columns) -> list:
    """One float per completion from the Python reward function, NaN where it returned None (the completion is then
    unscored). It is called as TRL calls reward functions: prompts and completions as decoded text, the completions'
    token ids (up to their EOS), and the dataset's other columns of these rows, by name."""
    name = f"{getattr(reward_fn, '__module__', '?')}:{getattr(reward_fn, '__name__', '?')} (--reward-fn)"
    try:
        returned = reward_fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as error:
        error.add_note(f"raised inside the reward function {name}")
        raise
    values = returned.tolist() if hasattr(returned, "tolist") else returned  # a tensor or an array: its numbers
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(returned).__name__}"
        sys.exit(f"error: the reward function {name} returned {got} for {len(completions)} completions; it must "
                 "return a list of one float (or None) per completion")
    for i, value in enumerate(values):
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
            sys.exit(f"error: the reward function {name} returned {value!r} for completion {i} "
                     f"({completions[i][:80]!r}); it must return a finite float, or None to leave it unscored")
    return [math.nan if value is None else float(value) for value in values]


def chunk_function_scores(reward_fn, tokenizer, queries, responses, response_mask, rows, columns):
    """(b,) --reward-fn scores of one chunk's completions: their text, token ids and dataset columns (rows: theirs)."""
    texts = (tokenizer.batch_decode(ids, skip_special_tokens=True) for ids in (queries, responses))
    completion_ids = [ids[mask].tolist() for ids, mask in zip(responses, response_mask)]
    chunk_columns = {name: [values[row] for row in rows] for name, values in columns.items()}
    return torch.tensor(function_scores(reward_fn, *texts, completion_ids, chunk_columns), device=queries.device)


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

    def forward(self, query_responses, attention_mask, context_length, temperature, top_p=1.0) -> PolicyOutput:
        output = policy_forward(self.policy, query_responses, attention_mask, context_length, temperature, top_p)
        values = response_values(self.value_model, query_responses, attention_mask, context_length)
        return output._replace(values=values)


def prompt_batches(prompts, prompts_per_update, local_prompts, rank, pad_id, generator):
    """Endless left-padded prompt batches, reshuffled every epoch over the dataset; this process's slice of each."""
    # (each with its rows in `prompts`, for --reward-fn's columns)
    while True:
        order = torch.randperm(len(prompts), generator=generator).tolist()
        for start in range(0, len(order) - prompts_per_update + 1, prompts_per_update):
            rows = order[start : start + prompts_per_update][rank * local_prompts : (rank + 1) * local_prompts]
            width = max(len(prompts[row]) for row in rows)
            yield torch.tensor([[pad_id] * (width - len(prompts[row])) + prompts[row] for row in rows]), rows


def main(args: Args) -> None:
    accelerator = start_processes(args)
    rank, is_main, device = accelerator.process_index, accelerator.is_main_process, accelerator.device
    plugin = accelerator.state.deepspeed_plugin  # (configured by start_processes; None without DeepSpeed)
    zero_stage, ds_config = (plugin.zero_stage, plugin.deepspeed_config) if plugin else (None, None)
    run_name = check_output_dir(args, accelerator)

    # Sampling and minibatch order use the global generator, per process; the prompt order its own, shared by all.
    process_seed = args.seed + 100003 * rank  # so that seed s on process 1 is not seed s + 1 on process 0
    random.seed(process_seed)
    np.random.seed(process_seed)
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
    if args.stop_token_id is not None:
        if not 0 <= args.stop_token_id < len(tokenizer):
            sys.exit(f"error: --stop-token-id {args.stop_token_id} is not a token id of this tokenizer (0 to "
                     f"{len(tokenizer) - 1})")
        stop_id = args.stop_token_id
    prompts, columns = load_prompts(args, tokenizer, accelerator)
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None

    # Models: the policy and reference in fp32 (so the KL is exactly 0 at first in every dtype), computing under
    # autocast; the reward model stored in the compute dtype; all in eval mode: dropout off, as Huang et al. require.
    policy, ref_policy, reward_model, value_model = load_models(args, dtype, device, tokenizer, prompts, pad_id,
                                                                zero_stage, ds_config)
    # (with LoRA, the policy's adapters and the whole value model)
    parameters = [p for p in (*policy.parameters(), *value_model.parameters()) if p.requires_grad]
    # fused: one kernel for all the parameters (5.5x faster than the default foreach on this CPU, also on GPUs)
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, eps=1e-8, weight_decay=0.0, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / args.num_updates)
    count = lambda params: sum(getattr(p, "ds_numel", p.numel()) for p in params)  # noqa: E731 (ZeRO-3: full sizes)
    models = [m for m in (policy, ref_policy, reward_model, value_model) if isinstance(m, torch.nn.Module)]
    accelerator.print(f"{len(models)} models hold {count(p for m in models for p in m.parameters()) / 1e6:.2f}M "
                      f"parameters; {count(parameters) / 1e6:.2f}M are trained (AdamW keeps 2 fp32 values for each)")
    # fp16 gradients underflow without loss scaling (DeepSpeed scales its own)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16" and zero_stage is None)
    accelerator.register_for_checkpointing(scheduler, scaler)  # saved and restored with the models and the optimizer
    # DDP averages the gradients of what trains through policy_and_value; generation, no-grad passes: the plain models
    policy_and_value, optimizer = accelerator.prepare(PolicyAndValue(policy, value_model), optimizer)
    unwrapped_policy_and_value = accelerator.unwrap_model(policy_and_value)
    unwrapped_policy, unwrapped_value_model = unwrapped_policy_and_value.policy, unwrapped_policy_and_value.value_model

    # The sampler: the policy itself, or a copy held as an inference engine holds it (--sampler-dtype) and refreshed
    # every --sampler-sync-every updates. The copy is saved with each checkpoint, so a resumed run samples alike.
    sampler = unwrapped_policy
    if args.sampler_dtype != "same" or args.sampler_sync_every > 1:
        sampler_dtype = {"same": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
                         "fp16": torch.float16}[args.sampler_dtype]
        sampler = copy.deepcopy(unwrapped_policy).to(sampler_dtype).requires_grad_(False).eval()
        accelerator.register_for_checkpointing(sampler)
    learner_top_p = args.top_p if args.top_p_logprobs == "renormalized" else 1.0
    # With one micro-batch per optimizer step, one step per epoch and one rollout chunk, the first training forward
    # would run over exactly the rollout's completions before any step: the rollout's policy forward becomes that
    # forward, run with autograd and trained on in the first epoch (exact, and one forward fewer per update).
    train_on_rollout_forward = (args.train_on_rollout_forward and args.num_mini_batches == 1
                                and args.gradient_accumulation_steps == 1
                                and args.local_rollout_forward_batch_size >= args.local_batch_size)
    first_update = resume(accelerator, args)

    metrics_file, wandb = open_logs(args, run_name, is_main)
    batches = prompt_batches(prompts, args.batch_size, args.local_batch_size, rank, pad_id, data_generator)
    for _ in range(first_update - 1):  # a resumed run replays the prompt order from the seed up to where it stopped
        next(batches)
    local_mini_batch_size = args.mini_batch_size // args.world_size  # each process trains on its own completions
    start_time = time.time()
    accelerator.print(f"{args.num_updates} updates of {args.batch_size} completions (one per prompt) on "
                      f"{args.world_size} x {device.type}, {args.dtype}; output in {args.output_dir}")
    for update in range(first_update, args.num_updates + 1):
        update_start = time.perf_counter()
        # each phase's wall time (the rest is time/other); rollout_forward: the reference, reward, policy and value
        # passes that score the rollout (the policy's being the first training pass where it is kept)
        seconds = dict.fromkeys(("generation", "rollout_forward", "training_forward", "backward", "optimizer"), 0.0)
        if sampler is not unwrapped_policy and (update - 1) % args.sampler_sync_every == 0:
            sampler.load_state_dict(unwrapped_policy.state_dict())  # the engine takes the policy's weights
        # 1. Generate: one completion per prompt.
        prompt_ids, rows = next(batches)
        queries = prompt_ids.to(device)  # (B, Tq)
        context_length = queries.shape[1]
        chunks = []  # (responses, mask, logprobs, ref_logprobs, scores, values) of each chunk
        sampler_chunks = []  # each chunk's logprobs under the sampler
        with torch.no_grad(), autocast():
            for i in range(0, len(queries), args.local_rollout_forward_batch_size):  # chunk_*: this chunk's rows
                chunk_queries = queries[i : i + args.local_rollout_forward_batch_size]
                with whole_policy(policy_and_value, unwrapped_policy, zero_stage), timed(seconds, "generation"):
                    chunk_responses, chunk_mask, sampled_logprobs = sample(
                        sampler, chunk_queries, pad_id, stop_id, args.response_length, temperature, args.top_p)
                if not torch.isfinite(sampled_logprobs).all():  # NaN logits would be sampled as the last token
                    stop_non_finite(update, "logits in sampling")
                chunk_query_responses = torch.cat([chunk_queries, chunk_responses], 1)
                chunk_attention_mask = torch.cat([chunk_queries != pad_id, chunk_mask], 1)
                with timed(seconds, "rollout_forward"):
                    # 2. Logprobs of the sampled tokens under the reference and the policy (or the sampler's); values.
                    chunk_ref_logprobs = policy_forward(ref_policy, chunk_query_responses, chunk_attention_mask,
                                                        context_length, temperature, learner_top_p).logprobs
                    if train_on_rollout_forward:  # the first epoch's training pass, kept (with its graph)
                        with torch.enable_grad(), accelerator.accumulate(policy_and_value):
                            kept_forward = policy_and_value(chunk_query_responses, chunk_attention_mask,
                                                            context_length, temperature, learner_top_p)
                        chunk_logprobs, chunk_values = kept_forward.logprobs.detach(), kept_forward.values.detach()
                    else:
                        chunk_logprobs, _, chunk_values = unwrapped_policy_and_value(
                            chunk_query_responses, chunk_attention_mask, context_length, temperature, learner_top_p)
                    chunk_logprobs = sampled_logprobs if args.old_logprobs == "generate" else chunk_logprobs
                    # 3. Score: the reward model reads the last real token.
                    last_index = context_length + chunk_mask.sum(1) - 1
                    chunk_scores = torch.zeros(len(chunk_queries), device=device)  # a reward model, a function or both
                    if reward_model is not None:
                        chunk_scores = args.reward_model_weight * reward_scores(
                            reward_model, chunk_query_responses, chunk_attention_mask, last_index)
                        if not torch.isfinite(chunk_scores).all():
                            stop_non_finite(update, "score")
                    if reward_fn is not None:  # NaN where it returned None: the completion is unscored
                        chunk_scores = chunk_scores + args.reward_fn_weight * chunk_function_scores(
                            reward_fn, tokenizer, chunk_queries, chunk_responses, chunk_mask,
                            rows[i : i + args.local_rollout_forward_batch_size], columns)
                sampler_chunks.append(sampled_logprobs)
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
        sampler_logprobs = torch.cat(sampler_chunks)
        scored = ~scores.isnan()  # False where --reward-fn returned None: out of the whitening and of both losses
        if args.kl_estimator == "k3":  # as TRL's PPOTrainer; 0 after the stop token, as k1
            log_ratio = -kl  # log p_ref - log p
            kl = (log_ratio.exp() - 1) - log_ratio
        loss_mask, value_mask = response_mask & scored[:, None], value_positions(response_mask) & scored[:, None]
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
        for name, value in (("score", scores[scored]), ("KL", kl)):
            if not torch.isfinite(value).all():  # in every dtype: nothing good is learnt from a NaN reward
                stop_non_finite(update, name)
        # The sampler is not the learner: per token, the old policy's log-probability under the learner minus under
        # the sampler (0 with --old-logprobs generate, where they are the same numbers). The correction's weight w of
        # a token scales its advantage, the same as scaling its clipped term (rollout_weights has the estimators).
        rollout_log_ratio = logprobs - sampler_logprobs
        is_ratio, is_weights, is_corrected = rollout_weights(rollout_log_ratio, response_mask, args.rollout_correction,
                                                             args.rollout_correction_cap)
        advantages = advantages * is_weights
        for epoch in range(args.num_ppo_epochs):
            order = torch.randperm(args.local_batch_size, device=device)
            for mb_start in range(0, args.local_batch_size, local_mini_batch_size):
                for micro_start in range(mb_start, mb_start + local_mini_batch_size, args.per_device_train_batch_size):
                    idx = order[micro_start : micro_start + args.per_device_train_batch_size]
                    if epoch == 0 and train_on_rollout_forward:  # the rollout's own pass, kept: same computation
                        output = PolicyOutput(*(tensor[idx] for tensor in kept_forward))
                    else:  # (accumulate: DDP averages the gradients over processes at the last micro-batch)
                        with autocast(), accelerator.accumulate(policy_and_value), timed(seconds, "training_forward"):
                            output = policy_and_value(query_responses[idx], attention_masks[idx], context_length,
                                                      temperature, learner_top_p)  # everything the loss below may use
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
                    # Checked before backward, inside which DeepSpeed steps (fp16's loss scaling skips such steps)
                    if args.dtype != "fp16" and not torch.isfinite(loss + vf_loss):
                        stop_non_finite(update, "loss")
                    with timed(seconds, "backward"):  # (under DeepSpeed, also the step at the last micro-batch)
                        accelerator.backward(scaler.scale(loss + args.vf_coef * vf_loss))  # divides by accumulation
                # The minibatch's step: the gradient clipped over all processes, then AdamW (fp16: through the scaler)
                with timed(seconds, "optimizer"):  # (under DeepSpeed the engine has stepped inside backward)
                    scaler.unscale_(optimizer)
                    grad_norm = accelerator.clip_grad_norm_(parameters, args.max_grad_norm)  # the norm before clipping
                    if args.dtype != "fp16" and not math.isfinite(grad_norm):
                        stop_non_finite(update, "gradient", stepped=zero_stage is not None)
                    stats["grad_norm"].append(torch.as_tensor(grad_norm, dtype=torch.float32, device=device))
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)

        # 7. Log: one dict per update, to the console, metrics.jsonl and wandb.
        metrics = {
            **update_metrics(accelerator, stats, first_minibatch, args.cliprange, kl=kl, logprobs=logprobs,
                             response_mask=response_mask.long(), non_score_reward=non_score_reward,
                             rlhf_reward=rlhf_reward, scores=scores, returns=returns, values=values,
                             value_mask=value_mask.long(), scored=scored.long(), rollout_log_ratio=rollout_log_ratio,
                             is_ratio=is_ratio, is_corrected=is_corrected.long()),
            "val/num_eos_tokens": (responses == eos_id).sum().item(),  # this process's, as TRL logs it
            "lr": scheduler.get_last_lr()[0], "episode": update * args.batch_size,
            "eps": (update - first_update + 1) * args.batch_size / (time.time() - start_time),
            "time/update": time.perf_counter() - update_start,
        }
        metrics.update(time_metrics(seconds, metrics["time/update"], device))
        if is_main:
            report(args, update, metrics, tokenizer, (queries, responses, response_mask, scores), metrics_file, wandb)
        scheduler.step()  # after logging: `lr` is the rate this update trained with, as TRL logs it

        # 8. Checkpoint: every --save-every updates, at the end, and after a stop signal (Ctrl-C, preemption).
        stopping = signalled(accelerator)
        if update % args.save_every == 0 or update == args.num_updates or stopping:
            save_checkpoint(accelerator, args, update)
        if stopping and update < args.num_updates:  # (at the last update the run simply ends, saving the policy)
            accelerator.print(f"stopped by a signal after update {update}; saved a checkpoint; run the same command "
                              "with --resume to continue")
            sys.exit(128 + (STOP_SIGNALS or [signal.SIGTERM])[0])  # the shell's code for death by that signal

    # Every process takes part in collecting the weights (a no-op without sharding); the main one writes them.
    state_dict = accelerator.get_state_dict(policy_and_value)
    if is_main:
        metrics_file.close()
        part = lambda prefix: {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}  # noqa
        # (with LoRA: the adapters, and their base model's name)
        unwrapped_policy.save_pretrained(args.output_dir, state_dict=part("policy."))
        tokenizer.save_pretrained(args.output_dir)
        unwrapped_value_model.save_pretrained(os.path.join(args.output_dir, "value_model"),
                                              state_dict=part("value_model."))
        print(f"saved the policy and tokenizer to {args.output_dir}, the value model to its value_model/")
        if args.merge_lora_on_save:  # the adapters added into the weights: a plain model (the run ends here)
            unwrapped_policy.merge_and_unload().save_pretrained(os.path.join(args.output_dir, "merged"))
            tokenizer.save_pretrained(os.path.join(args.output_dir, "merged"))
        if args.track:
            wandb.finish()
    accelerator.wait_for_everyone()  # no process exits while another still needs it


# ---- Plumbing: flags, processes, loading, logging ----

# The flags, and the preset, that only ppo_full.py has
FULL_ONLY = set("""save-every keep-checkpoints resume overwrite resume-anyway reward-fn reward-model-weight
    reward-fn-weight sampler-dtype sampler-sync-every top-p top-p-logprobs rollout-correction rollout-correction-cap
    gradient-checkpointing lora-r lora-alpha lora-dropout lora-target-modules merge-lora-on-save
    train-on-rollout-forward pythia-6.9b stop-token-id kl-estimator""".split())
FULL_ONLY = set()  # (this is ppo_full.py)


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
        (args.save_every < 1 or args.keep_checkpoints < 1, "--save-every and --keep-checkpoints must be >= 1"),
        (args.stop_token is not None and args.stop_token_id is not None, "--stop-token-id needs --stop-token None "
         "(the default is eos): one stop token at a time"),
        (args.resume and args.overwrite, "--resume and --overwrite contradict each other; pass one"),
        (args.resume and not args.output_dir, "--resume needs --output-dir: the directory of the run to continue"),
        (args.reward_model_path == "none" and not args.reward_fn, "--reward-model-path none leaves no score: give "
         "--reward-fn too"),
        (args.sampler_sync_every < 1, f"--sampler-sync-every must be >= 1 (got {args.sampler_sync_every})"),
        (not 0 < args.top_p <= 1, f"--top-p must be in (0, 1] (got {args.top_p})"),
        (not args.rollout_correction_cap > 0, "--rollout-correction-cap must be > 0"),
        (args.rollout_correction != "none" and args.old_logprobs == "generate", "--old-logprobs generate takes the "
         "sampler's own logprobs, so --rollout-correction has nothing to correct; use --old-logprobs forward"),
        (args.lora_r < 0, f"--lora-r must be >= 0 (got {args.lora_r}; 0 is full fine-tuning)"),
        (not 0 <= args.lora_dropout < 1, f"--lora-dropout must be in [0, 1) (got {args.lora_dropout})"),
        (args.merge_lora_on_save and not args.lora_r, "--merge-lora-on-save needs --lora-r: there is nothing to merge"),
        (args.lora_r > 0 and (args.sampler_dtype != "same" or args.sampler_sync_every > 1), "a sampler copy "
         "(--sampler-dtype, --sampler-sync-every) is not supported with --lora-r; drop one of them"),
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
    if accelerator.distributed_type.name not in ("NO", "MULTI_GPU", "MULTI_CPU", "DEEPSPEED"):
        sys.exit(f"error: {accelerator.distributed_type.name} is not supported by ppo.py (data parallel only); "
                 "DeepSpeed ZeRO runs in ppo_full.py")
    args.world_size = accelerator.num_processes
    zero_stage = accelerator.state.deepspeed_plugin.zero_stage if accelerator.state.deepspeed_plugin else None
    if zero_stage == 3 and (args.sampler_dtype != "same" or args.sampler_sync_every > 1):
        sys.exit("error: a sampler copy (--sampler-dtype, --sampler-sync-every) is not supported under ZeRO-3, whose "
                 "shards it would gather whole; use ZeRO-2 or data parallel")
    if zero_stage == 3 and args.lora_r:
        sys.exit("error: --lora-r is not supported under ZeRO-3 (with LoRA the frozen weights are meant to fit "
                 "whole); use ZeRO-2 or data parallel")
    if accelerator.state.deepspeed_plugin is None:
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
    args.value_model_path = args.value_model_path or (args.sft_model_path if args.reward_model_path == "none"
                                                      else args.reward_model_path)
    check_args(args)
    if args.total_episodes % args.batch_size:
        accelerator.print(f"note: --total-episodes {args.total_episodes} is not a multiple of the {args.batch_size} "
                          f"completions per update; training on {args.num_updates * args.batch_size}")
    ds_config = None
    if zero_stage is not None:
        # Under DeepSpeed ZeRO the flags, not the accelerate config, set the sizes, the clipping and the precision;
        # the config sets the stage and any offloading. bf16 then means bf16 weights with fp32 master weights in
        # the optimizer (DeepSpeed's mixed precision), and the frozen models are held the same way (frozen()).
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=args.per_device_train_batch_size,
                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                         train_batch_size=args.mini_batch_size, gradient_clipping=args.max_grad_norm,
                         bf16={"enabled": args.dtype == "bf16"}, fp16={"enabled": args.dtype == "fp16"})
        ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # a loadable save
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # ZeRO-3's from_pretrained reads this config
    return accelerator


def check_output_dir(args: Args, accelerator):
    """The run's name; its directory is checked before anything is loaded or written, never to lose a run's results."""
    # An existing run is continued (--resume), replaced (--overwrite) or left alone.
    run_name = broadcast_object_list([f"{args.exp_name}__{args.model}__{args.seed}__{int(time.time())}"])[0]
    args.output_dir = args.output_dir or os.path.join("runs", run_name)
    checkpoint = (saved_checkpoints(args.output_dir) or [None])[-1] if args.resume else None
    saved_args_path = os.path.join(args.output_dir, "args.json")
    saved = json.load(open(saved_args_path)) if os.path.isfile(saved_args_path) else {}
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        sys.exit(f"error: --output-dir {args.output_dir!r} is a file; choose a directory")
    found = set(os.listdir(args.output_dir)) if os.path.isdir(args.output_dir) else set()
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")  # a run that stopped before its first update
    unstarted = "args.json" in found and not (os.path.exists(metrics_path) and os.path.getsize(metrics_path)) and (
        found <= {"args.json", "metrics.jsonl", "wandb", "wandb_id"})  # has nothing to lose: it may start again
    if found and not unstarted:
        if not (args.resume or args.overwrite):
            sys.exit(f"error: --output-dir {args.output_dir!r} is not empty; choose another directory (ppo_full.py "
                     "--resume continues a run in it, --overwrite replaces it)")
        if "script" not in saved:
            sys.exit(f"error: --output-dir {args.output_dir!r} holds no run (no args.json naming its script), so "
                     "--resume and --overwrite leave it alone; choose another directory")
        if saved["script"] != SCRIPT and not (args.resume and args.resume_anyway):
            sys.exit(f"error: --output-dir {args.output_dir!r} holds a run of {saved['script']}, not of {SCRIPT}; "
                     "choose another directory" + (f" (or add --resume-anyway to continue it with {SCRIPT})"
                                                   * args.resume))
        if args.resume and saved["script_sha256"] != SCRIPT_SHA256 and not args.resume_anyway:
            sys.exit(f"error: {SCRIPT} has changed since it made the run in {args.output_dir!r} (source sha256 "
                     f"{saved['script_sha256'][:12]} -> {SCRIPT_SHA256[:12]}); add --resume-anyway to continue it "
                     "with the code as it is now")
        if args.resume and not checkpoint and os.path.exists(os.path.join(args.output_dir, "model.safetensors")):
            sys.exit(f"error: --output-dir {args.output_dir!r} holds a finished run without checkpoints, so there is "
                     "nothing to resume; pass --overwrite to train it again")
    if args.resume and saved:  # (settings a fork added or removed cannot be compared)
        changed = [f"{'--' + k.replace('_', '-') if k != 'world_size' else 'processes'} {saved[k]} -> {v}"
                   for k, v in json.loads(json.dumps(dataclasses.asdict(args))).items()  # (tuples as in args.json)
                   if k not in RUN_ONLY_SETTINGS | DERIVED_SETTINGS and k in saved and saved[k] != v]
        if saved.get("reward_fn_sha256", "") != reward_fn_sha256(args.reward_fn) and not args.resume_anyway:
            changed.append(f"the file of --reward-fn {args.reward_fn} (add --resume-anyway to go on with it as it is)")
        if changed:
            sys.exit(f"error: --resume needs the interrupted run's settings (its args.json), but {', '.join(changed)}")
    if args.resume:
        logged_updates(metrics_path)  # a damaged line stops the run here, before anything is loaded or written
    accelerator.wait_for_everyone()  # every process has checked before the main one writes anything
    return run_name


def saved_checkpoints(output_dir):
    """The checkpoints in output_dir/checkpoints, oldest first. A checkpoint only gets its update_N name once it is
    complete (it is renamed into place), so a crash while writing one leaves the previous one the newest."""
    root = os.path.join(output_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in sorted(names) if n.startswith("update_") and n[7:].isdigit()]


# The run records which code made it (args.json): --resume continues only a run of this very source, and of the same
# --reward-fn file.
SCRIPT = os.path.basename(__file__)
SCRIPT_SHA256 = hashlib.sha256(open(__file__, "rb").read()).hexdigest()


def reward_fn_sha256(spec):
    """The hash of --reward-fn's file (`path/to/file.py:function`, or a module's file on the path); "" without one."""
    module_name = spec.rpartition(":")[0]
    try:  # (a module that cannot be found is load_reward_fn's one-line error, later)
        found = importlib.util.find_spec(module_name) if module_name and not module_name.endswith(".py") else None
    except (ImportError, ValueError):
        found = None
    path = module_name if module_name.endswith(".py") else getattr(found, "origin", None)
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if path and os.path.isfile(path) else ""


def logged_updates(metrics_path):
    """(line, update) for each complete line of a run's metrics.jsonl; a damaged line stops the run, naming it."""
    logged = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for number, line in enumerate(f, 1):
                if not line.endswith("\n"):  # the last line, cut off by a crash: it is redone
                    continue
                try:
                    logged.append((line, int(json.loads(line)["update"])))
                except (ValueError, KeyError, TypeError) as error:
                    sys.exit(f"error: line {number} of {metrics_path} is damaged ({type(error).__name__}); repair or "
                             "delete that line, then run again")
    return logged


# Settings that change how a run is run (where it logs, how often it saves, memory for compute), not what it computes:
# a resumed run may change them. Every other setting must be the same as the interrupted run's.
RUN_ONLY_SETTINGS = {"exp_name", "output_dir", "track", "wandb_project_name", "wandb_entity", "save_every",
                     "keep_checkpoints", "resume", "overwrite", "resume_anyway", "num_sample_generations",
                     "gradient_checkpointing"}
DERIVED_SETTINGS = {"batch_size", "local_batch_size", "mini_batch_size", "num_updates"}  # follow from the others


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
    # Also returns, with --reward-fn, the dataset's other columns of the same rows.
    dataset = load_or_exit(lambda p: load_dataset(p, split=args.dataset_train_split), args.dataset_name,
                           "dataset", "--dataset-name and --dataset-train-split")
    if args.prompt_column not in dataset.column_names:
        sys.exit(f"error: the dataset has no column {args.prompt_column!r} (it has {dataset.column_names}); "
                 "set --prompt-column")
    texts = dataset[args.prompt_column]
    not_text = next((row for row, text in enumerate(texts) if not isinstance(text, str)), None)
    if not_text is not None:
        sys.exit(f"error: row {not_text} of the dataset's column {args.prompt_column!r} is {texts[not_text]!r}, not "
                 "text; fix that row or set --prompt-column")
    tokenized = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    kept = [row for row, ids in enumerate(tokenized) if 0 < len(ids) <= args.max_prompt_length]
    prompts = [tokenized[row] for row in kept]
    if len(prompts) < len(dataset):
        empty = sum(1 for ids in tokenized if not ids)
        accelerator.print(f"({empty} empty, {len(dataset) - len(prompts) - empty} too long)")
        accelerator.print(f"dropped {len(dataset) - len(prompts)} of {len(dataset)} prompts: empty or longer than "
                          f"--max-prompt-length {args.max_prompt_length}")
    if len(prompts) < args.batch_size:
        sys.exit(f"error: only {len(prompts)} prompts fit --max-prompt-length {args.max_prompt_length}; "
                 f"an update needs {args.batch_size}")
    # The other columns of the kept rows, for --reward-fn (a verifier may read a reference answer there)
    other = [name for name in dataset.column_names if name != args.prompt_column] if args.reward_fn else []
    columns = {name: [values[row] for row in kept] for name, values in ((n, dataset[n]) for n in other)}
    return prompts, columns


def load_models(args: Args, dtype, device, tokenizer, prompts, pad_id, zero_stage, ds_config):
    """The policy, the reference, the reward and the value model, checked against the tokenizer and the prompts."""
    policy = load_or_exit(lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32),
                          args.sft_model_path, "SFT policy", "--sft-model-path").eval()
    if args.lora_r:  # the reference is the policy with its adapters off; the value model still trains in full
        policy, ref_policy = with_lora(policy, args)
    else:
        ref_policy = load_or_exit(lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32),
                                  args.sft_model_path, "SFT policy", "--sft-model-path")
        ref_policy = frozen(ref_policy, device, zero_stage, ds_config, args)
    reward_model = None
    if args.reward_model_path != "none":
        reward_model = load_or_exit(
            lambda p: AutoModelForSequenceClassification.from_pretrained(p, dtype=dtype, num_labels=1,
                                                                         output_loading_info=True),
            args.reward_model_path, "reward model", "--reward-model-path")
        reward_model = frozen(reward_model, device, zero_stage, ds_config, args)
    # Without a reward model the value model may start from the SFT policy's backbone, its head freshly drawn
    value_model = load_or_exit(
        lambda p: AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32, num_labels=1,
                                                                     output_loading_info=reward_model is not None),
        args.value_model_path, "value model", "--value-model-path").eval()
    value_model.config.pad_token_id = pad_id  # its forward pools at the last non-pad token (unused here, but needed)
    positions, longest = getattr(policy.config, "max_position_embeddings", None), max(map(len, prompts))
    if positions and longest + args.response_length > positions:
        sys.exit(f"error: the longest prompt ({longest} tokens) + --response-length {args.response_length} exceed the "
                 f"policy's {positions} positions; lower --max-prompt-length or --response-length")
    for model, flag in ((policy, "--sft-model-path"), (reward_model, "--reward-model-path"),
                        (value_model, "--value-model-path")):
        if model is None:
            continue
        embeddings = model.get_input_embeddings().num_embeddings
        if len(tokenizer) > embeddings:  # a token id past the table fails only mid-rollout (on a GPU, an assert)
            sys.exit(f"error: the tokenizer has {len(tokenizer)} tokens, more than the {embeddings} embeddings of the "
                     f"model at {flag}; use a tokenizer and models that match")
    if args.gradient_checkpointing:
        for model in (policy, value_model):
            checkpoint_layers(model)
    return policy, ref_policy, reward_model, value_model


def frozen(model, device, zero_stage, ds_config, args: Args):
    """The reference and reward models: never trained, no gradients. Under DeepSpeed they become inference engines,
    held like the policy: in its precision and, under ZeRO-3, sharded over the processes."""
    model.requires_grad_(False)
    if zero_stage is None:
        return model.to(device).eval()
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size, "bf16": ds_config["bf16"],
              "fp16": ds_config["fp16"],
              "zero_optimization": ds_config["zero_optimization"] if zero_stage == 3 else {"stage": 0}}
    return deepspeed.initialize(model=model, config=config)[0].module.eval()


def resume(accelerator, args: Args):
    """With --resume: weights, optimizer, scheduler, scaler (and the sampler copy) and every process's RNG states come
    back from the newest checkpoint, the prompt order is replayed from the seed and metrics.jsonl drops the lines
    logged after the checkpoint, so the run goes on as if it had never stopped. Returns the first update to run."""
    checkpoint = (saved_checkpoints(args.output_dir) or [None])[-1] if args.resume else None
    if not checkpoint:
        if args.resume:
            accelerator.print(f"no checkpoint in {args.output_dir}: starting the run from the beginning")
        return 1
    try:
        accelerator.load_state(checkpoint)
    except Exception as error:  # noqa: BLE001 (a checkpoint damaged on disk: whatever torch raises, say which)
        sys.exit(f"error: cannot load the checkpoint {checkpoint} ({type(error).__name__}: "
                 f"{(str(error).splitlines() or [''])[0]}); delete it to resume from the one before")
    with open(os.path.join(checkpoint, "trainer_state.json")) as f:
        first_update = json.load(f)["update"] + 1
    accelerator.print(f"resuming {args.output_dir} after update {first_update - 1} ({checkpoint})")
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process and os.path.exists(metrics_path):  # (those updates are done again)
        with open(metrics_path + ".tmp", "w") as f:
            f.writelines(line for line, update in logged_updates(metrics_path) if update < first_update)
        os.replace(metrics_path + ".tmp", metrics_path)
    return first_update


def open_logs(args: Args, run_name, is_main):
    """args.json, metrics.jsonl and wandb (--track), on the main process: (metrics file, wandb module) or None."""
    # args.json names the script, its source's hash and --reward-fn's, and which script ran which updates (a run
    # continued with --resume-anyway, a run of rloo.py before the core and the full script were split).
    if not is_main:  # only the main process logs and saves
        return None, None
    metrics_path, saved_args_path = (os.path.join(args.output_dir, name) for name in ("metrics.jsonl", "args.json"))
    saved = json.load(open(saved_args_path)) if args.resume and os.path.isfile(saved_args_path) else {}
    history, logged = saved.get("history", []), logged_updates(metrics_path) if saved else []
    if logged and (saved["script"], saved["script_sha256"]) != (SCRIPT, SCRIPT_SHA256):
        history = history + [{"script": saved["script"], "script_sha256": saved["script_sha256"],
                              "first_update": history[-1]["last_update"] + 1 if history else 1,
                              "last_update": logged[-1][1]}]
    if args.overwrite:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump({**dataclasses.asdict(args), "script": SCRIPT, "script_sha256": SCRIPT_SHA256, "history": history,
                   "reward_fn_sha256": reward_fn_sha256(args.reward_fn)}, f, indent=2)
    metrics_file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a")
    if not args.track:
        return metrics_file, None
    import wandb

    # A resumed run logs to the same wandb run; an unreachable wandb falls back to offline logging.
    id_path = os.path.join(args.output_dir, "wandb_id")
    wandb_kwargs = dict(project=args.wandb_project_name, entity=args.wandb_entity, name=run_name,
                        config=dataclasses.asdict(args), dir=args.output_dir)
    wandb_kwargs.update(id=open(id_path).read() if os.path.exists(id_path) else None, resume="allow")
    try:
        wandb.init(**wandb_kwargs)
    except Exception as error:  # noqa: BLE001 (wandb raises many kinds; none of them should stop training)
        print(f"wandb unreachable ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
              f"logging offline to {args.output_dir}/wandb (`wandb sync` uploads it later)")
        wandb.init(**wandb_kwargs, mode="offline")
    with open(id_path, "w") as f:
        f.write(wandb.run.id)
    return metrics_file, wandb


@contextlib.contextmanager
def whole_policy(engine, policy, zero_stage):
    """Under ZeRO-3 each process holds a shard of every weight, and each layer gathers its own in its forward.
    Generation runs the model once per token, so the rollout gathers the whole policy once instead, with the
    per-layer hooks off meanwhile (TRL does the same). Elsewhere there is nothing to gather."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    hooks = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(policy.parameters())):
        hooks._remove_module_hooks()
        try:
            yield
        finally:
            hooks.forward_hooks.clear()
            hooks.backward_hooks.clear()
            hooks.setup_zero_stage3_hooks()


def save_checkpoint(accelerator, args: Args, update):
    """Every process writes its part into update_N.partial, renamed to update_N once complete; then the oldest beyond
    --keep-checkpoints go."""
    path = os.path.join(args.output_dir, "checkpoints", f"update_{update:07d}")
    if accelerator.is_main_process:
        shutil.rmtree(path + ".partial", ignore_errors=True)  # left by a crash while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(path + ".partial")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(path + ".partial", "trainer_state.json"), "w") as f:
            json.dump({"update": update, "episode": update * args.batch_size}, f)
        os.sync()  # on disk before it is named: a power cut cannot leave a complete-looking partial checkpoint
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".partial", path)
        for old in saved_checkpoints(args.output_dir)[: -args.keep_checkpoints]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# SIGINT (Ctrl-C) and SIGTERM (preemption) are recorded here; the loop then finishes the update under way, saves a
# checkpoint and exits, all processes after the same update. A second SIGINT exits at once. (Installed when the
# script runs as a program, not when main() is called from Python.)
STOP_SIGNALS = []


def stop_after_this_update(signum, frame):
    if STOP_SIGNALS and signum == signal.SIGINT:
        sys.exit("error: interrupted again; stopped at once, without saving (the newest checkpoint is intact)")
    STOP_SIGNALS.append(signum)
    if int(os.environ.get("RANK", "0")) == 0:  # os.write: the signal may have landed inside a print
        os.write(1, f"{signal.Signals(signum).name}: finishing this update, then saving a checkpoint (Ctrl-C again: "
                    "stop now)\n".encode())


def signalled(accelerator):
    """Whether a stop signal reached any process; then every process stops after this same update."""
    if STOP_SIGNALS:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def stop_non_finite(update, quantity, stepped=False):
    state = "after DeepSpeed's step" if stepped else "stopped before the optimizer step, so the weights stay finite"
    sys.exit(f"error: update {update}: non-finite {quantity}; {state}; nothing was saved")


@contextlib.contextmanager
def timed(seconds, phase):
    """Adds the block's wall time to seconds[phase]. On a GPU it waits for the kernels queued before the block and
    for its own, so that each phase is charged its own work (the waits cost a little throughput)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds[phase] += time.perf_counter() - start


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


def rollout_diagnostics(log_ratio, mask, ratio, corrected):
    """rollout/*: how far the sampler is from the learner, and what the correction did. mismatch_kl: KL(sampler ||
    learner) per real token, by the k3 estimator r - 1 - log r (r the learner-over-sampler ratio of the sampled
    token; verl's k3_kl); over the loss terms (completions for RLOO, real tokens for PPO): the ratio's mean, std and
    max, the share the correction truncated or masked, and the effective sample size of the uncorrected ratios,
    (sum r)^2 / (n sum r^2), the share of the batch plain importance sampling would use."""
    terms = mask if ratio.dim() == 2 else torch.ones_like(ratio, dtype=torch.bool)
    ratio, corrected = ratio[terms], corrected[terms]
    return {"rollout/mismatch_kl": (log_ratio.exp() - 1 - log_ratio)[mask].mean().item(),
            "rollout/is_weight_mean": ratio.mean().item(), "rollout/is_weight_std": ratio.std().item(),
            "rollout/is_weight_max": ratio.max().item(), "rollout/corrected_share": corrected.float().mean().item(),
            "rollout/ess": (ratio.sum() ** 2 / (len(ratio) * (ratio**2).sum())).item()}


def update_metrics(accelerator, stats, first_minibatch, cliprange, **completions):
    """TRL's metrics of one update, with TRL's names and definitions, over every process's completions (gathered in
    process order). Each list in `stats` is logged as its mean under its own name: a fork's statistic is logged too."""
    g = {name: accelerator.gather(tensor) for name, tensor in completions.items()}
    stats = {name: accelerator.gather(torch.stack(values)) for name, values in stats.items()}
    new, old, mask = (accelerator.gather(torch.cat(tensors)) for tensors in zip(*first_minibatch))
    scored = g["scored"].bool()  # False where --reward-fn gave None
    returns, values, valid = g["returns"], g["values"], g["value_mask"].bool()
    return {
        "objective/kl": g["kl"].sum(1).mean().item(),
        # TRL's: each padding position counts -1 (TRL fills their logprobs with 1.0); entropy_no_padding: 0
        "objective/entropy": (-g["logprobs"].sum(1) - (g["response_mask"] == 0).sum(1)).mean().item(),
        "objective/entropy_no_padding": -g["logprobs"].sum(1).mean().item(),
        "objective/non_score_reward": g["non_score_reward"].mean().item(),
        "objective/rlhf_reward": g["rlhf_reward"][scored].mean().item(),
        "objective/scores": g["scores"][scored].mean().item(),
        "objective/unscored": (~scored).sum().item(),  # completions --reward-fn returned None for
        **{name: per_step.mean().item() for name, per_step in stats.items()},
        "val/explained_variance": (1 - (returns - values)[valid].var() / returns[valid].var()).item(),
        # (of a single micro-batch: 0, where TRL's var() gives NaN)
        "val/ratio_var": stats["val/ratio"].var().item() if len(stats["val/ratio"]) > 1 else 0.0,
        **ratio_diagnostics(new, old, mask.bool(), cliprange),
        **rollout_diagnostics(g["rollout_log_ratio"], g["response_mask"].bool(), g["is_ratio"],
                              g["is_corrected"].bool()),
    }


def time_metrics(seconds, update_seconds, device):
    """Wall time per phase of this update (time/other: batching, masks, rewards, advantages, gathering the metrics)
    and the peak memory so far."""
    return {**{f"time/{phase}": value for phase, value in seconds.items()},
            "time/other": update_seconds - sum(seconds.values()),
            "memory/peak_gb": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30}


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
    signal.signal(signal.SIGINT, stop_after_this_update)
    signal.signal(signal.SIGTERM, stop_after_this_update)
    main(parse_args())
