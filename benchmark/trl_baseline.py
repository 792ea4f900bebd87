"""TRL 0.21.0's RLOOTrainer or PPOTrainer at the settings our scripts are benchmarked at: seconds per update and
peak memory, as a baseline for rloo.py and ppo.py.

Runs in its own venv (TRL 0.21 needs transformers 4.55, our scripts a newer one), TRL used as a library:

    python3 -m venv /work/trl021-venv
    /work/trl021-venv/bin/pip install torch==2.13.0 trl==0.21.0 transformers==4.55.4 datasets accelerate
    /work/trl021-venv/bin/python benchmark/trl_baseline.py --trainer rloo --sft-model-path P \
        --reward-model-path R --dataset-name D --updates 4 --output-json trl-rloo.json

Equal settings: each update takes --batch-size COMPLETIONS, as in our scripts. TRL 0.21's RLOO counts
`per_device_train_batch_size` in completions too (local_batch_size = per_device x accumulation x minibatches) and
draws local_batch_size / rloo_k prompts per update, each repeated rloo_k times; PPO draws local_batch_size prompts,
one completion each (its PPO counts per_device x accumulation as the whole batch: the sizes given to it below make
the same minibatches and micro-batches as the scripts'). --num-mini-batches and --gradient-accumulation-steps
(default 1) as the scripts take them; the whole batch generated and scored in one chunk,
exactly --response-length tokens per completion (no stop token, no missing-EOS penalty), temperature 0.7,
fp32 (or --dtype bf16), seed 1, torch's default thread count. The policy, its reference (a second copy) and the
reward model load from the given directories; PPO's value model is another copy of the reward model, as in ppo.py.

Time: the wall time between consecutive updates, taken by a callback at `on_step_end`, which both trainers call
once per update; the first update is warm-up, the result is the median over updates 2..N. Memory: the process's
peak RSS (ru_maxrss), as our scripts log memory/peak_gb on a CPU (GB = 2**30 bytes). On 2 cores another busy
process slows an update several times over, so each update also records how many cores other processes used
(from /proc/stat), and a warning says when a timed update was not run on an idle machine.

Phases: the same split as the full scripts' time/*, by wrapping TRL's calls with a clock (PhaseClock): its
batch_generation (generation), each model's forward and backbone and TRL's selective_log_softmax, charged to
rollout_forward under no_grad and to training_forward with grad, accelerator.backward (backward), and the
optimizer's step and zero_grad (optimizer). The rest (TRL's in-place logits / temperature, its statistics' entropy,
its gc.collect()) is the update's time outside the phases.
Only the outermost wrapped call is charged, so the policy's forwards inside generation count as generation.
"""

import argparse
import collections
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=("rloo", "ppo"), required=True)
    parser.add_argument("--sft-model-path", required=True, help="directory of the SFT policy (and its tokenizer)")
    parser.add_argument("--reward-model-path", required=True, help="directory of the reward model")
    parser.add_argument("--dataset-name", required=True, help="dataset directory with a `prompt` column of text")
    parser.add_argument("--dataset-train-split", default="train")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--updates", type=int, default=4, help="updates to run, at least 2 (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="completions per update (RLOO: batch / k prompts)")
    parser.add_argument("--rloo-k", type=int, default=2, help="RLOO's completions per prompt")
    parser.add_argument("--response-length", type=int, default=32, help="tokens per completion (no early stop)")
    parser.add_argument("--num-ppo-epochs", type=int, default=1, help="optimisation epochs per update")
    parser.add_argument("--num-mini-batches", type=int, default=1, help="optimizer steps per epoch")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--max-prompt-length", type=int, default=64, help="longer prompts are dropped")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--learning-rate", type=float, default=3e-6, help="as our scripts' default")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: TRL's bf16=True: accelerate's autocast around the trained module's forward only "
                        "(the reference, reward model and PPO's generation and rollout value pass stay fp32)")
    parser.add_argument("--output-json", required=True, help="where the result is written")
    args = parser.parse_args(argv)
    if args.updates < 2:
        parser.error("--updates must be at least 2 (the first update is warm-up)")
    for name in ("batch_size", "rloo_k", "response_length", "num_ppo_epochs", "max_prompt_length", "num_mini_batches",
                 "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.batch_size % (args.num_mini_batches * args.gradient_accumulation_steps):
        parser.error("--num-mini-batches x --gradient-accumulation-steps must divide --batch-size")
    if args.trainer == "ppo" and args.num_mini_batches > 1 and args.gradient_accumulation_steps > 1:
        # TRL 0.21's PPOTrainer counts per_device x accumulation as the whole batch, and steps the optimizer once
        # every `accumulation` micro-batches across minibatch boundaries: this work has no equal there.
        parser.error("TRL's PPOTrainer cannot run several minibatches that each accumulate micro-batches")
    if args.trainer == "rloo" and (args.rloo_k < 2 or args.batch_size % args.rloo_k):
        parser.error(f"RLOO needs --rloo-k >= 2 dividing --batch-size (got {args.batch_size} and {args.rloo_k})")
    return args


def peak_gb() -> float:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def busy_cpu_seconds():
    """CPU seconds the whole machine has been busy (Linux /proc/stat; None elsewhere) and this process's own: the
    difference over an update is what other processes took, which slows a 2-core machine's update a lot."""
    own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None, own
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own


class PhaseClock:
    """Wall time of the wrapped calls, per phase; a call inside another wrapped call belongs to the outer one."""

    def __init__(self):
        self.seconds, self.running = collections.defaultdict(float), False

    def wrap(self, function, phase=None):
        """phase None: rollout_forward under no_grad, training_forward with grad."""
        import torch

        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self.running:
                return function(*args, **kwargs)
            name = phase or ("training_forward" if torch.is_grad_enabled() else "rollout_forward")
            self.running, start = True, time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.running = False
                self.seconds[name] += time.perf_counter() - start

        return timed


def check_dir(path: str, what: str, flag: str, needs: str = "") -> None:
    """Local directories only (there is no hub here): a clear one-line error instead of a hub lookup's traceback."""
    if not os.path.isdir(path):
        sys.exit(f"error: {what} not found: {path!r} is not a directory; check {flag}")
    if needs and not os.path.exists(os.path.join(path, needs)):
        sys.exit(f"error: {what} at {path!r} has no {needs}; check {flag}")


def load_tokenizer(path: str):
    """The SFT model's tokenizer, left-padded, with a pad token (added if missing, as Huang et al.'s scripts do).
    A tokenizer saved by transformers 5 names its class TokenizersBackend, which 4.55 does not know: its
    tokenizer.json then loads as a plain fast tokenizer, with the special tokens of tokenizer_config.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    except (ValueError, OSError) as error:
        if not os.path.exists(os.path.join(path, "tokenizer.json")):
            sys.exit(f"error: no tokenizer could be loaded from {path!r} ({str(error).splitlines()[0]})")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        sys.exit(f"error: the tokenizer at {path!r} needs an EOS token and a pad token distinct from it")
    return tokenizer


def load_prompts(args, tokenizer, prompts_per_update: int):
    """A dataset of tokenised prompts (`input_ids` only, the one column TRL 0.21 reads), without special tokens;
    prompts longer than --max-prompt-length are dropped."""
    from datasets import Dataset, load_dataset

    check_dir(args.dataset_name, "dataset", "--dataset-name")
    try:
        raw = load_dataset(args.dataset_name, split=args.dataset_train_split)
    except Exception as error:  # noqa: BLE001 (datasets raises many kinds for a bad directory or split)
        sys.exit(f"error: cannot load the dataset {args.dataset_name!r}, split {args.dataset_train_split!r} "
                 f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    if args.prompt_column not in raw.column_names:
        sys.exit(f"error: the dataset has no column {args.prompt_column!r} (it has {raw.column_names})")
    ids = tokenizer(list(raw[args.prompt_column]), add_special_tokens=False)["input_ids"]
    kept = [row for row in ids if len(row) <= args.max_prompt_length]
    if len(kept) < len(ids):
        print(f"dropped {len(ids) - len(kept)} of {len(ids)} prompts longer than --max-prompt-length "
              f"{args.max_prompt_length}", flush=True)
    if len(kept) < prompts_per_update:
        sys.exit(f"error: only {len(kept)} prompts fit --max-prompt-length {args.max_prompt_length}; an update "
                 f"needs {prompts_per_update}")
    return Dataset.from_dict({"input_ids": kept}), len(ids)


def main(argv=None) -> None:
    args = parse_args(argv)
    check_dir(args.sft_model_path, "SFT model", "--sft-model-path", "config.json")
    check_dir(args.reward_model_path, "reward model", "--reward-model-path", "config.json")

    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback

    transformers.set_seed(args.seed)  # the trainers seed torch themselves, but not numpy (their epoch shuffles)
    rloo = args.trainer == "rloo"
    micro = args.batch_size // (args.num_mini_batches * args.gradient_accumulation_steps)
    prompts_per_update = args.batch_size // args.rloo_k if rloo else args.batch_size
    tokenizer = load_tokenizer(args.sft_model_path)
    train_dataset, dataset_rows = load_prompts(args, tokenizer, prompts_per_update)

    def load(cls, path, what, **kwargs):
        try:
            model, info = cls.from_pretrained(path, torch_dtype=torch.float32, output_loading_info=True, **kwargs)
        except Exception as error:  # noqa: BLE001
            sys.exit(f"error: cannot load the {what} from {path!r} ({type(error).__name__}: "
                     f"{str(error).splitlines()[0] if str(error) else ''})")
        if info["missing_keys"]:  # e.g. a reward model without a trained score head would be random
            sys.exit(f"error: the {what} at {path!r} lacks weights: {info['missing_keys'][:3]}")
        return model

    rss_before_models = peak_gb()
    policy = load(AutoModelForCausalLM, args.sft_model_path, "SFT policy")
    ref_policy = load(AutoModelForCausalLM, args.sft_model_path, "SFT policy")
    reward_model = load(AutoModelForSequenceClassification, args.reward_model_path, "reward model", num_labels=1)
    models = [policy, ref_policy, reward_model]
    if not rloo:
        value_model = load(AutoModelForSequenceClassification, args.reward_model_path, "value model", num_labels=1)
        models.append(value_model)
    if len(tokenizer) > policy.get_input_embeddings().num_embeddings:
        sys.exit(f"error: the tokenizer has {len(tokenizer)} tokens, more than the policy's embeddings")
    for model in models[2:]:
        model.config.pad_token_id = tokenizer.pad_token_id
    parameters = sum(p.numel() for m in models for p in m.parameters())
    updates = args.updates

    class UpdateTimer(TrainerCallback):
        """Wall time of each update: on_train_begin comes right before TRL's update loop, on_step_end once at the
        end of every update (after its optimisation epochs and logging)."""

        def __init__(self):
            self.seconds, self.peaks, self.others, self.last, self.cpu = [], [], [], None, None
            self.clock, self.phases, self.charged = PhaseClock(), [], {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.cpu = time.perf_counter(), busy_cpu_seconds()

        def on_step_end(self, args, state, control, **kwargs):
            now, cpu = time.perf_counter(), busy_cpu_seconds()
            self.seconds.append(now - self.last)
            self.phases.append({phase: total - self.charged.get(phase, 0.0)
                                for phase, total in self.clock.seconds.items()})
            self.charged = dict(self.clock.seconds)
            self.peaks.append(peak_gb())
            # cores' worth of CPU other processes used during this update (None without /proc/stat)
            others = None if cpu[0] is None else max(0.0, (cpu[0] - self.cpu[0]) - (cpu[1] - self.cpu[1]))
            self.others.append(None if others is None else others / self.seconds[-1])
            self.last, self.cpu = now, cpu
            print(f"update {len(self.seconds)}/{updates}: {self.seconds[-1]:.2f}s, peak {self.peaks[-1]:.2f} GB"
                  + ("" if others is None else f", other processes used {self.others[-1]:.2f} cores"), flush=True)

    timer = UpdateTimer()
    with tempfile.TemporaryDirectory(prefix="trl-baseline-") as output_dir:  # nothing is saved; TRL wants a dir
        common = dict(
            output_dir=output_dir, exp_name=f"trl_{args.trainer}", seed=args.seed, report_to="none",
            logging_steps=1, save_strategy="no", eval_strategy="no", push_to_hub=False, disable_tqdm=True,
            bf16=args.dtype == "bf16", fp16=False,  # OnPolicyConfig turns bf16 on unless told
            # (transformers refuses bf16 without a GPU unless told the run is on the CPU)
            **({"use_cpu": True} if args.dtype == "bf16" and not torch.cuda.is_available() else {}),
            # The same work as the scripts: TRL's RLOO counts like them; its PPO takes per_device x accumulation as
            # the whole batch, so with one minibatch per_device is a micro-batch, and with several (no accumulation)
            # per_device is the whole batch.
            per_device_train_batch_size=micro if rloo or args.num_mini_batches == 1 else args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps, num_mini_batches=args.num_mini_batches,
            local_rollout_forward_batch_size=args.batch_size, total_episodes=updates * args.batch_size,
            num_ppo_epochs=args.num_ppo_epochs, response_length=args.response_length, stop_token=None,
            stop_token_id=None, missing_eos_penalty=None, temperature=args.temperature,
            num_sample_generations=0, learning_rate=args.learning_rate, sft_model_path=args.sft_model_path,
            reward_model_path=args.reward_model_path)
        if rloo:
            config = trl.RLOOConfig(**common, rloo_k=args.rloo_k)
            trainer = trl.RLOOTrainer(config=config, processing_class=tokenizer, policy=policy, ref_policy=ref_policy,
                                      reward_model=reward_model, train_dataset=train_dataset, callbacks=[timer])
        else:
            config = trl.PPOConfig(**common)
            trainer = trl.PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                                     reward_model=reward_model, value_model=value_model, train_dataset=train_dataset,
                                     callbacks=[timer])
        # The sizes TRL derived: every update must be batch-size completions, in the minibatches asked for.
        derived = {"local_batch_size": config.local_batch_size, "mini_batch_size": config.mini_batch_size,
                   "micro_batch_size": config.micro_batch_size, "num_total_batches": config.num_total_batches,
                   "prompts_per_update": trainer.local_dataloader_batch_size}
        expected = {"local_batch_size": args.batch_size, "mini_batch_size": args.batch_size // args.num_mini_batches,
                    "micro_batch_size": config.per_device_train_batch_size, "num_total_batches": updates,
                    "prompts_per_update": prompts_per_update}
        if derived != expected:
            sys.exit(f"error: TRL derived other batch sizes than asked: {derived} instead of {expected}")
        clock = timer.clock  # the phases: TRL's module-level batch_generation, the models' calls, backward, the step
        trainer_module = sys.modules[type(trainer).__module__]
        trainer_module.batch_generation = clock.wrap(trainer_module.batch_generation, "generation")
        for model in models:
            backbone = getattr(model, model.base_model_prefix)  # TRL's get_reward calls the backbone directly
            model.forward, backbone.forward = clock.wrap(model.forward), clock.wrap(backbone.forward)
        # TRL's log-softmax at the sampled tokens runs outside the models' calls (ours, inside policy_forward)
        trainer_module.selective_log_softmax = clock.wrap(trainer_module.selective_log_softmax)
        trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward")
        trainer.optimizer.step = clock.wrap(trainer.optimizer.step, "optimizer")
        trainer.optimizer.zero_grad = clock.wrap(trainer.optimizer.zero_grad, "optimizer")
        print(f"TRL {trl.__version__} {args.trainer.upper()}: {updates} updates of {args.batch_size} completions "
              f"({prompts_per_update} prompts" + (f" x k={args.rloo_k}" if rloo else "") + f") x "
              f"{args.response_length} tokens, {args.num_ppo_epochs} epoch(s), {args.dtype}, {torch.get_num_threads()} "
              f"threads; {len(models)} models hold {parameters / 1e6:.2f}M parameters", flush=True)
        trainer.train()

    if len(timer.seconds) != updates:
        sys.exit(f"error: TRL ran {len(timer.seconds)} updates, not {updates}")
    s_per_update = statistics.median(timer.seconds[1:])
    result = {
        "trainer": args.trainer,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "s_per_update": s_per_update,
        "per_update_s": timer.seconds,
        **{f"{phase}_s": statistics.median(p.get(phase, 0.0) for p in timer.phases[1:])
           for phase in ("generation", "rollout_forward", "training_forward", "backward", "optimizer")},
        "phases_per_update": timer.phases,
        "peak_gb": peak_gb(),
        "peak_gb_per_update": timer.peaks,
        "other_cores_per_update": timer.others,  # CPU other processes took, in cores: > 0.1 means a noisy time
        "peak_gb_before_models": rss_before_models,  # the interpreter and imports, before any model was loaded
        "parameters": parameters,
        "settings": {
            "updates": updates, "batch_size": args.batch_size, "completions_per_update": args.batch_size,
            "prompts_per_update": prompts_per_update, "rloo_k": args.rloo_k if rloo else None,
            "response_length": args.response_length, "num_ppo_epochs": args.num_ppo_epochs,
            "num_mini_batches": args.num_mini_batches, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "local_rollout_forward_batch_size": args.batch_size,
            "max_prompt_length": args.max_prompt_length, "prompts": len(train_dataset), "dataset_rows": dataset_rows,
            "temperature": args.temperature, "stop_token": None, "missing_eos_penalty": None, "dtype": args.dtype,
            "learning_rate": args.learning_rate, "seed": args.seed, "torch_threads": torch.get_num_threads(),
            "sft_model_path": args.sft_model_path, "reward_model_path": args.reward_model_path,
            "dataset_name": args.dataset_name, "trl_derived": derived,
        },
    }
    busy = [x for x in timer.others[1:] if x is not None and x > 0.1]
    if busy:
        print(f"warning: other processes used up to {max(busy):.2f} cores during {len(busy)} of the timed updates; "
              "the time is not clean (run again on an idle machine)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"TRL {trl.__version__} {args.trainer.upper()}: {s_per_update:.2f} s/update (median of updates "
          f"2..{updates}), peak {result['peak_gb']:.2f} GB; wrote {args.output_json}", flush=True)


if __name__ == "__main__":
    main()
