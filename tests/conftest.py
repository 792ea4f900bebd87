"""Shared fixtures: offline stand-ins for the hub artefacts, built with the same formats."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "benchmark"))
import trl_parity  # noqa: E402

# Metric names shared by rloo.py and ppo.py: TRL's, and the first-minibatch ratio diagnostics.
TRL_METRICS = ["objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
               "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "val/ratio",
               "val/ratio_var", "val/num_eos_tokens", "lr", "episode", "eps"]
DIAG_METRICS = [f"diag/ratio_{kind}_{stat}" for kind in ("token", "seq") for stat in ("mean", "std", "min", "max")]
DIAG_METRICS += ["diag/clipfrac_token", "diag/clipfrac_seq"]


def run_script(script, *flags, timeout=600):
    """Run a top-level script (or, given its path, a forked copy of one, with the project on its import path) as a
    user would; returns the CompletedProcess (never raises on failure)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": ROOT})


@pytest.fixture(scope="session")
def parity_world(tmp_path_factory):
    """benchmark/trl_parity.py's small world (its root and its description), rebuilt from its seeds in a second."""
    root = str(tmp_path_factory.mktemp("trl-parity") / "small")
    return root, trl_parity.build_world(root, "small")


def run_ours(world, case, result, patch="", full_script=False):
    """One case of benchmark/trl_parity.py through a core, or its full script (the harness's own side), in a process
    of its own, with `patch` run first; returns what it recorded."""
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'benchmark')!r}]\n{patch}\n"
            f"import trl_parity; trl_parity.main(['--side', 'ours', '--world', {world!r}, '--case', {case!r}, "
            f"'--result', {str(result)!r}]" + (" + ['--full-script']" if full_script else "") + ")")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(result) as f:
        return json.load(f)


def assert_one_line_error(result, message):
    """A foreseeable mistake: a non-zero exit whose last line carries `message`, and no traceback."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr.strip().splitlines()[-1]


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="the whole suite: also the tests marked slow (as CI runs it)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: in the whole suite only (python -m pytest --full): the full scripts' "
                                       "features, the benchmarks, and every run that is not a core's quick check")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--full"):
        skip = pytest.mark.skip(reason="in the whole suite only: python -m pytest --full")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def refused(module, flags):
    """The one-line message with which `module`'s main() refuses these flags (parsed as the command line would be),
    run in this process: a foreseeable mistake must exit before anything is written."""
    with pytest.raises(SystemExit) as exited:
        module.main(module.parse_args(flags))
    message = str(exited.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_run(reference, resumed):
    """The same metrics for every update (the clocks aside) and bitwise the same final weights."""
    timing = ("time/", "eps", "memory/")
    strip = lambda rows: [{k: v for k, v in row.items() if not k.startswith(timing)} for row in rows]  # noqa: E731
    assert strip(read_metrics(resumed)) == strip(read_metrics(reference))
    for weights in ["model.safetensors", "adapter_model.safetensors", "value_model/model.safetensors"]:
        if (reference / weights).exists():
            expected, got = load_file(reference / weights), load_file(resumed / weights)
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), weights


def pythia_flags(paths, output_dir, *extra):
    """The pythia-1b preset's settings with the hub names swapped for the local stand-ins, at toy sizes."""
    return ["--model", "pythia-1b", "--sft-model-path", paths["sft_model_path"],
            "--reward-model-path", paths["reward_model_path"], "--tokenizer-path", paths["tokenizer_path"],
            "--dataset-name", paths["dataset_name"], "--output-dir", str(output_dir), "--dtype", "fp32",
            "--per-device-train-batch-size", "4", "--gradient-accumulation-steps", "2",
            "--local-rollout-forward-batch-size", "8", "--response-length", "12", *extra]


@pytest.fixture(scope="session")
def pythia_like(tmp_path_factory):
    """A randomly initialised Pythia-architecture policy and reward model, a tokenizer with Pythia's
    special-token settings (EOS "<|endoftext|>" at id 0, no pad token, more embedding rows than tokens)
    and a local dataset with the schema of trl-internal-testing/tldr-preference-sft-trl-style."""
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("pythia_like")
    words = "SUBREDDIT: r/relationships r/tifu TITLE: POST: TL;DR: my friend and I went to the store today it was fun but we lost keys".split()
    vocab = {"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    config = GPTNeoXConfig(vocab_size=len(vocab) + 8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=True,
                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(root / "sft")
    config.num_labels = 1
    GPTNeoXForSequenceClassification(config).save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "tokenizer")

    def rows(n, offset):
        for i in range(n):
            post = " ".join(words[8 + (i + j) % (len(words) - 8)] for j in range(5 + i % 7))
            prompt = f"SUBREDDIT: r/tifu\n\nTITLE: {words[8 + i % 5]} today\n\nPOST: {post}\n\nTL;DR:"
            yield {"id": f"t3_{offset + i}", "prompt": prompt,
                   "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": " we lost keys"}]}

    splits = DatasetDict({"train": Dataset.from_list(list(rows(64, 0))), "validation": Dataset.from_list(list(rows(16, 64)))})
    for split, data in splits.items():
        data.to_parquet(str(root / "dataset" / "data" / f"{split}-00000-of-00001.parquet"))
    return {"sft_model_path": str(root / "sft"), "reward_model_path": str(root / "reward"),
            "tokenizer_path": str(root / "tokenizer"), "dataset_name": str(root / "dataset")}
