"""rloo.py, the core, run as a user runs it (a subprocess with flags, on offline stand-ins for the hub artefacts),
and its refusals of bad flags and inputs, in this process."""

import dataclasses
import json
from statistics import mean

import pytest
import torch
from conftest import DIAG_METRICS, TRL_METRICS, pythia_flags, read_metrics, refused, run_script
from transformers import AutoModelForCausalLM, AutoTokenizer

import rloo


def test_pythia_code_path_trains_logs_and_saves(pythia_like, tmp_path):
    output_dir = tmp_path / "run"
    result = run_script("rloo.py", *pythia_flags(pythia_like, output_dir, "--total-episodes", "48", "--track"))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(output_dir)
    assert [m["update"] for m in metrics] == [1, 2, 3]  # 48 episodes / (4 x 2 x 2 minibatches)
    for name in TRL_METRICS + DIAG_METRICS:
        assert all(torch.isfinite(torch.tensor(float(m[name]))) for m in metrics), name
    assert metrics[-1]["episode"] == 48
    assert metrics[0]["objective/kl"] == 0.0  # policy == reference before the first update
    # --old-logprobs forward: at the first minibatch the ratio is exactly 1 and nothing is clipped.
    assert all(m["diag/ratio_token_min"] == m["diag/ratio_token_max"] == 1.0 for m in metrics)
    assert all(m["diag/clipfrac_seq"] == 0.0 for m in metrics)
    args = json.load(open(output_dir / "args.json"))
    # Linear decay to zero over the run; each update logs the rate it trained with (as TRL logs it).
    assert [m["lr"] for m in metrics] == pytest.approx([args["learning_rate"] * (1 - u / 3) for u in range(3)])
    assert args["sft_model_path"] == pythia_like["sft_model_path"] and args["batch_size"] == 16
    # The saved policy reloads, with the [PAD] token the script added to Pythia's tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert tokenizer.pad_token == "[PAD]" and tokenizer.pad_token_id != tokenizer.eos_token_id
    policy = AutoModelForCausalLM.from_pretrained(output_dir)
    initial = AutoModelForCausalLM.from_pretrained(pythia_like["sft_model_path"])
    changed = [not torch.equal(a, b) for a, b in zip(policy.parameters(), initial.parameters())]
    assert any(changed)
    assert policy.generation_config.temperature in (None, 1.0)  # the sampling config is not saved with the model
    # --track (WANDB_MODE=offline here) logs the sample completions as wandb tables.
    tables = list(output_dir.glob("wandb/offline-run-*/files/media/table/samples_*.table.json"))
    assert tables and json.load(open(tables[0]))["columns"] == ["query", "response", "score"]


@pytest.mark.parametrize("flags,message", [
    (["--prompt-column", "text"], "no column 'text'"),
    (["--max-prompt-length", "2"], "prompts fit --max-prompt-length"),
    (["--response-length", "100000"], "exceed the policy's"),
    (["--reward-model-path", "SFT"], "has no trained score.weight (is it a sequence-classification model"),
    (["--sft-model-path", "nowhere"], "cannot load the SFT policy from 'nowhere'"),
])
def test_bad_input_gets_one_line_error_and_writes_nothing(pythia_like, tmp_path, flags, message):
    output_dir = tmp_path / "run"
    flags = [pythia_like["sft_model_path"] if flag == "SFT" else flag for flag in flags]  # a causal LM, no score head
    assert message in refused(rloo, pythia_flags(pythia_like, output_dir, "--total-episodes", "48", *flags))
    assert not output_dir.exists()


def test_mismatched_models_and_bad_data_are_named_before_anything_is_written(pythia_like, tmp_path):
    from datasets import load_dataset
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    import rloo_full

    rows = load_dataset(pythia_like["dataset_name"], split="train").to_list()
    texts = [row["prompt"] for row in rows]
    directory = tmp_path / "none_prompt"
    directory.mkdir()
    with open(directory / "train.jsonl", "w") as f:
        for row, prompt in zip(rows, texts[:3] + [None] + texts[4:]):
            f.write(json.dumps({"prompt": prompt, "id": row["id"]}) + "\n")
    flags = pythia_flags(pythia_like, tmp_path / "none", "--total-episodes", "16", "--dataset-name", str(directory))
    # The full script names a prompt that is not text by row and column.
    assert "row 3 of the dataset's column 'prompt' is None, not text" in refused(rloo_full, flags)
    # A reward model whose vocabulary is smaller than the tokenizer's is refused before the first rollout.
    config = GPTNeoXConfig(vocab_size=5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=1)
    GPTNeoXForSequenceClassification(config).save_pretrained(tmp_path / "small_reward")
    flags = pythia_flags(pythia_like, tmp_path / "vocab", "--total-episodes", "16", "--reward-model-path",
                         str(tmp_path / "small_reward"))
    assert "more than the 5 embeddings of the model at --reward-model-path" in refused(rloo, flags)
    # A stop token that the tokenizer does not have would never stop a completion.
    flags = pythia_flags(pythia_like, tmp_path / "stop", "--total-episodes", "16", "--stop-token", "None",
                         "--stop-token-id", "1000000")
    assert "--stop-token-id 1000000 is not a token id of this tokenizer" in refused(rloo_full, flags)
    assert not any((tmp_path / name).exists() for name in ("none", "vocab", "stop"))


def test_unknown_preset_and_the_full_scripts_flags_are_refused_with_one_line(capsys):
    for flags, message in [(["--model", "pythia-70b"], "unknown --model 'pythia-70b'"),
                           (["--resume"], "--resume is in rloo_full.py, not in the core rloo.py"),
                           (["--lora-r=8"], "--lora-r=8 is in rloo_full.py"),
                           (["--no-train-on-rollout-forward"], "is in rloo_full.py"),
                           (["--model", "pythia-6.9b"], "pythia-6.9b is in rloo_full.py")]:
        with pytest.raises(SystemExit) as exited:
            rloo.parse_args(flags)
        assert message in str(exited.value.code)


def test_the_core_names_every_flag_only_the_full_script_has_and_no_other():
    import rloo_full

    def flags(module):
        return {field.name.replace("_", "-") for field in dataclasses.fields(module.Args)}

    assert rloo.FULL_ONLY == flags(rloo_full) - flags(rloo) | {"pythia-6.9b"}


def test_help_shows_the_chosen_presets_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        rloo.parse_args(["--model", "pythia-1b", "--help"])
    assert exited.value.code == 0
    unwrapped = "".join(c for c in capsys.readouterr().out if not c.isspace() and c != "│")  # help wraps values
    assert "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr" in unwrapped
    assert "trl-internal-testing/tldr-preference-sft-trl-style" in unwrapped


def test_tiny_preset_runs_end_to_end_and_saves_a_loadable_policy(tmp_path):
    output_dir = tmp_path / "run"
    # A run that stopped before its first update left nothing to lose: the same command starts it again.
    output_dir.mkdir()
    (output_dir / "args.json").write_text("{}")
    (output_dir / "metrics.jsonl").write_text("")
    result = run_script("rloo.py", "--output-dir", str(output_dir), "--total-episodes", "192")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "update 3/3" in result.stdout and " -> " in result.stdout  # progress lines and a sample table
    assert "deepspeed" not in (result.stdout + result.stderr).lower()  # installed, unused, and silent
    metrics = read_metrics(output_dir)
    assert len(metrics) == 3 and all(name in metrics[-1] for name in TRL_METRICS + DIAG_METRICS)
    # The gradient norm is logged before clipping: in the tiny preset every update is clipped to 1.
    assert all(m["grad_norm"] > 1.0 for m in metrics)
    # A run with results is never written over by another.
    result = run_script("rloo.py", "--output-dir", str(output_dir), "--total-episodes", "64")
    assert "is not empty; choose another directory" in result.stderr.strip().splitlines()[-1]
    assert len(read_metrics(output_dir)) == 3
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    policy = AutoModelForCausalLM.from_pretrained(output_dir)
    ids = tokenizer("SUBREDDIT: r/pets TITLE: cat help POST: cat rent boss TL;DR:", return_tensors="pt")["input_ids"]
    assert policy.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


def test_rloo_raises_the_reward_on_the_tiny_world(tmp_path):
    output_dir = tmp_path / "run"
    result = run_script("rloo.py", "--output-dir", str(output_dir), "--total-episodes", str(64 * 60), "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_metrics(output_dir)
    scores = [m["objective/scores"] for m in metrics]
    rlhf_reward = [m["objective/rlhf_reward"] for m in metrics]
    first, last = slice(0, 6), slice(-6, None)
    assert mean(scores[last]) > mean(scores[first]) + 0.3, scores
    assert mean(rlhf_reward[last]) > mean(rlhf_reward[first]) + 0.2, rlhf_reward


def test_gradient_checkpointing_keeps_only_layer_inputs_and_changes_no_gradient_or_sample(pythia_like):
    from rloo_full import checkpoint_layers, response_logprobs, sample

    plain, checkpointed = (AutoModelForCausalLM.from_pretrained(pythia_like["sft_model_path"]).eval() for _ in range(2))
    checkpoint_layers(checkpointed)
    ids = torch.randint(1, 20, (3, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded query
    saved_numbers, gradients = [], []
    for model in (plain, checkpointed):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            logprobs = response_logprobs(model, ids, mask, 8, 0.7)
        logprobs.sum().backward()
        saved_numbers.append(sum(saved))
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert saved_numbers[1] < saved_numbers[0] / 2  # the activations inside the layers are recomputed, not kept
    assert torch.equal(gradients[0], gradients[1])
    # Sampling (no autograd, a KV cache) is untouched.
    samples, pad_id = [], plain.config.vocab_size - 1
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        with torch.no_grad():
            samples.append(sample(model, ids[:, :8].masked_fill(~mask[:, :8], pad_id), pad_id, 0, 6, 0.7))
    assert all(torch.equal(a, b) for a, b in zip(*samples))
