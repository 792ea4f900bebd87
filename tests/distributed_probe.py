"""Runs rloo.py or ppo.py (as `torchrun ... distributed_probe.py SCRIPT RECORD_DIR FLAGS...`) and records, for each
process, what a data-parallel run must agree on; used by tests/test_distributed.py.

- After every optimizer step: the gradient norm before clipping and a checksum of the parameters (under DeepSpeed
  ZeRO, of the whole parameters gathered from the shards).
- Every prompt the process generated from, in order.
- Sampling is made a function of (prompt, how many times this prompt was sampled before), not of the batch it is
  in: each completion is sampled alone, from its own seed. A run over 2 processes with B completions each then
  samples exactly the completions of a run over 1 process with 2B, and the two must compute the same update.
"""

import collections
import json
import os
import signal
import sys
import types

import torch
import torch.nn.functional as F
from transformers.generation.utils import GenerationMixin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

script, record_dir, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ.get("RANK", 0))
records = {"grad_norms": [], "checksums": [], "prompts": [], "all_gathers": 0, "all_gathers_in_generate": 0}

# Count the all-gathers (ZeRO-3 gathers sharded weights with them), before anything keeps a reference to the function.
for name in ("all_gather_into_tensor", "all_gather"):
    def counted(*args, _original=getattr(torch.distributed, name), **kwargs):
        records["all_gathers"] += 1
        return _original(*args, **kwargs)

    setattr(torch.distributed, name, counted)

original_generate = GenerationMixin.generate
times_sampled = collections.Counter()


def generate_each_alone(self, input_ids, attention_mask, **kwargs):
    new_tokens = []
    for ids, mask in zip(input_ids, attention_mask):
        prompt = tuple(ids[mask.bool()].tolist())
        records["prompts"].append(prompt)
        torch.manual_seed(hash((prompt, times_sampled[prompt])) % 2**31)  # a tuple of ints hashes the same everywhere
        times_sampled[prompt] += 1
        alone = torch.tensor([prompt])
        before = records["all_gathers"]
        output = original_generate(self, input_ids=alone, attention_mask=torch.ones_like(alone), **kwargs)
        records["all_gathers_in_generate"] += records["all_gathers"] - before
        new_tokens.append(output.sequences[0, len(prompt) :])
    width = max(len(tokens) for tokens in new_tokens)
    pad_id = self.generation_config.pad_token_id
    new_tokens = torch.stack([F.pad(tokens, (0, width - len(tokens)), value=pad_id) for tokens in new_tokens])
    return types.SimpleNamespace(sequences=torch.cat([input_ids, new_tokens], 1))


original_clip = torch.nn.utils.clip_grad_norm_


def clip_and_record(parameters, *args, **kwargs):
    norm = original_clip(parameters, *args, **kwargs)
    records["grad_norms"].append(norm.item())
    return norm


original_step = torch.optim.AdamW.step


def step_and_record(self, *args, **kwargs):
    result = original_step(self, *args, **kwargs)
    params = [p for group in self.param_groups for p in group["params"]]
    records["checksums"].append(sum(p.detach().double().sum().item() for p in params))
    return result


GenerationMixin.generate = generate_each_alone
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":  # launched with benchmark/zero{2,3}.yaml
    import accelerate
    import deepspeed
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate counts a DeepSpeed launch without GPUs as one process unless it is told the backend; on GPUs the
    # scripts need nothing of this.
    original_init = accelerate.Accelerator.__init__

    def init_on_cpu(self, *args, **kwargs):
        original_init(self, *args, **{**kwargs, "cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]})
        # Shard even the tiny model's small tensors, which ZeRO-3 would otherwise keep whole on every process.
        self.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    accelerate.Accelerator.__init__ = init_on_cpu
    # DeepSpeed clips and steps inside its engine, on each process's shard: record the whole weights after each step.
    original_engine_step = deepspeed.DeepSpeedEngine.step

    def engine_step_and_record(self, *args, **kwargs):
        result = original_engine_step(self, *args, **kwargs)
        records["grad_norms"].append(float(self.get_global_grad_norm()))
        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            records["checksums"].append(sum(p.detach().double().sum().item() for p in self.module.parameters()))
        return result

    deepspeed.DeepSpeedEngine.step = engine_step_and_record
else:
    torch.nn.utils.clip_grad_norm_ = clip_and_record
    torch.optim.AdamW.step = step_and_record

module = __import__(script)
for stop_signal in (signal.SIGINT, signal.SIGTERM):  # as the script does when it runs as a program
    signal.signal(stop_signal, module.stop_after_this_update)
module.main(module.parse_args(flags))
os.makedirs(record_dir, exist_ok=True)
with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
    json.dump(records, f)
