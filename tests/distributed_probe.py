"""Runs rloo.py, ppo.py or their full scripts (as `torchrun ... distributed_probe.py SCRIPT RECORD_DIR FLAGS...`) and records, for each
process, what a data-parallel run must agree on; used by tests/test_distributed.py.

- After every optimizer step: the gradient norm before clipping and a checksum of the parameters (under DeepSpeed
  ZeRO, of the whole parameters gathered from the shards).
- Every prompt the process generated from, in order.
- Sampling is made a function of (prompt, how many times this prompt was sampled before), not of the batch it is
  in: each completion is sampled alone, from its own seed. A run over 2 processes with B completions each then
  samples exactly the completions of a run over 1 process with 2B, and the two must compute the same update.
"""

import collections
import functools
import json
import os
import signal
import sys

import torch

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

times_sampled = collections.Counter()


def sample_each_alone(original_sample, model, queries, pad_id, *args):
    sampled = []
    for query in queries:
        prompt = tuple(query[query != pad_id].tolist())
        records["prompts"].append(prompt)
        torch.manual_seed(hash((prompt, times_sampled[prompt])) % 2**31)  # a tuple of ints hashes the same everywhere
        times_sampled[prompt] += 1
        before = records["all_gathers"]
        sampled.append(original_sample(model, torch.tensor([prompt]), pad_id, *args))
        records["all_gathers_in_generate"] += records["all_gathers"] - before
    return tuple(torch.cat(parts) for parts in zip(*sampled))  # tokens, mask, logprobs: each (B, response_length)


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
module.sample = functools.partial(sample_each_alone, module.sample)
for stop_signal in (signal.SIGINT, signal.SIGTERM):  # as the full script does when it runs as a program
    if hasattr(module, "stop_after_this_update"):
        signal.signal(stop_signal, module.stop_after_this_update)
module.main(module.parse_args(flags))
os.makedirs(record_dir, exist_ok=True)
with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
    json.dump(records, f)
