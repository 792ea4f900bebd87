"""LoRA (--lora-r, issue #18): the reference policy is the policy's own model with its adapters switched off, only
the adapters train (and PPO's value model, in full), a LoRA run learns, resumes bitwise after kill -9, runs on two
processes, and saves adapters and a merged model that load as the evaluation tools load them."""

import json
from statistics import mean

import pytest
import torch
from conftest import assert_one_line_error, assert_same_run, read_metrics, run_script
from safetensors.torch import load_file
from test_reliability import checkpoints, read_until, start
from transformers import AutoModelForCausalLM

import tiny_world

pytestmark = pytest.mark.slow  # (the whole suite: python -m pytest --full)


def adapted(sft_path, **lora):
    """The SFT policy with LoRA adapters (rank 4 unless told), as rloo_full.py builds it, and its reference."""
    from rloo_full import Args, with_lora

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(sft_path).eval()
    return with_lora(model, Args(sft_model_path=sft_path, **{"lora_r": 4, **lora}))


def test_the_reference_is_the_base_model_exactly_and_only_the_adapters_train(pythia_like):
    from rloo_full import checkpoint_layers, response_logprobs

    sft_path = pythia_like["sft_model_path"]
    base = AutoModelForCausalLM.from_pretrained(sft_path).eval()
    (policy, reference), (checkpointed, _) = adapted(sft_path), adapted(sft_path)
    checkpoint_layers(checkpointed)
    ids = torch.randint(1, 20, (3, 14), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :4] = False  # a left-padded query
    logprobs = lambda model: response_logprobs(model, ids, mask, 8, 0.7)  # noqa: E731
    with torch.no_grad():
        base_logprobs = logprobs(base)
        # B starts at 0: until the first step the adapted policy is the SFT policy, to the bit (the KL is exactly 0)
        assert torch.equal(logprobs(policy), base_logprobs) and torch.equal(logprobs(reference), base_logprobs)
    trained = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    # Every linear layer but the output layer has an adapter (all-linear), in both GPT-NeoX blocks.
    layers = {name.split(".lora_")[0] for name in trained}
    assert len(layers) == 2 * 4 and not any("embed_out" in layer for layer in layers)

    gradients = []
    for model in (policy, checkpointed):  # recomputing the layers in backward changes no gradient
        logprobs(model).sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.equal(*gradients) and gradients[0].abs().sum() > 0
    assert all(p.grad is None for p in policy.parameters() if not p.requires_grad)  # the base gets no gradient
    torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0).step()
    with torch.no_grad():
        assert not torch.equal(logprobs(policy), base_logprobs)  # the policy moved...
        assert torch.equal(logprobs(reference), base_logprobs)  # ...and the reference is still the SFT policy


def test_lora_dropout_acts_in_the_policy_although_every_model_stays_in_eval_mode(pythia_like):
    from rloo_full import response_logprobs

    policy, reference = adapted(pythia_like["sft_model_path"], lora_dropout=0.5)
    for p in policy.parameters():  # adapters that do something, so that dropping their input shows
        if p.requires_grad:
            torch.nn.init.normal_(p)
    ids, mask = torch.randint(1, 20, (2, 12)), torch.ones(2, 12, dtype=torch.bool)
    with torch.no_grad():
        twice = [[response_logprobs(model, ids, mask, 6, 0.7) for _ in range(2)] for model in (policy, reference)]
    assert not torch.equal(*twice[0]) and torch.equal(*twice[1])


def policy_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("script,flags", [("rloo", ["--gradient-checkpointing"]), ("ppo", ["--dtype", "bf16"])])
def test_a_lora_run_trains_only_the_adapters_and_saves_adapters_and_a_merged_model_that_load(tmp_path, script, flags):
    from peft import PeftModel

    from benchmark.compare_runs import gold_figures

    output_dir = tmp_path / "run"
    result = run_script(f"{script}_full.py", "--output-dir", str(output_dir), "--total-episodes", "128", "--lora-r", "4",
                        "--merge-lora-on-save", "--num-sample-generations", "0", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{2 if script == 'rloo' else 3} models hold" in result.stdout  # no reference copy
    metrics = read_metrics(output_dir)
    assert metrics[0]["objective/kl"] == 0.0 and metrics[0]["diag/ratio_token_max"] == 1.0  # also under bf16
    assert metrics[1]["objective/kl"] != 0.0  # the adapters moved the policy

    # The checkpoint: the SFT weights untouched, and AdamW's state for exactly what trains (PPO: the value model too)
    sft_path = tiny_world.ensure_world()["sft_model_path"]
    sft = AutoModelForCausalLM.from_pretrained(sft_path).state_dict()
    checkpoint = output_dir / "checkpoints" / checkpoints(output_dir)[-1]
    state = load_file(checkpoint / "model.safetensors")
    policy = {k.removeprefix("policy.").removeprefix("base_model.model."): v for k, v in state.items()
              if not k.startswith("value_model.")}
    adapters = {k: v for k, v in policy.items() if ".lora_" in k}
    base = {k.replace(".base_layer.", "."): v for k, v in policy.items() if ".lora_" not in k}
    assert base.keys() == sft.keys() and all(torch.equal(base[k], sft[k]) for k in sft)
    trained = [*adapters.values(), *(v for k, v in state.items() if k.startswith("value_model."))]
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
    assert sorted(s["exp_avg"].numel() for s in optimizer.values()) == sorted(v.numel() for v in trained)

    # The adapters load with peft, and as the evaluation tools load a policy (transformers reads the adapter's
    # config and loads its base); the merged model loads without peft and computes the same logits.
    ids = torch.tensor([[5, 9, 12, 7, 3, 22, 14]])
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_path), output_dir).eval()
    as_tools_load = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    merged_dir = output_dir / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    expected = policy_logits(with_peft, ids)
    assert torch.equal(policy_logits(as_tools_load, ids), expected)
    torch.testing.assert_close(policy_logits(merged, ids), expected, rtol=0, atol=1e-5)
    assert (expected - policy_logits(AutoModelForCausalLM.from_pretrained(sft_path), ids)).abs().max() > 1e-4
    assert 0 <= gold_figures(str(output_dir), 8)["gold win rate"] <= 1  # compare_runs.py --gold reads the run
    config = json.load(open(output_dir / "adapter_config.json"))
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == sft_path


@pytest.mark.slow
def test_rloo_with_lora_raises_the_reward_on_the_tiny_world(tmp_path):
    output_dir = tmp_path / "run"
    result = run_script("rloo_full.py", "--output-dir", str(output_dir), "--total-episodes", str(64 * 60), "--seed", "1",
                        "--lora-r", "8", "--learning-rate", "1e-3", "--num-sample-generations", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = [m["objective/scores"] for m in read_metrics(output_dir)]
    assert mean(scores[-6:]) > mean(scores[:6]) + 0.3, scores


@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_kill_9_then_resume_with_lora_matches_the_uninterrupted_run(tmp_path, script):
    flags = ["--total-episodes", str(64 * 4), "--save-every", "2", "--num-sample-generations", "0", "--lora-r", "4"]
    result = run_script(f"{script}_full.py", *flags, "--output-dir", str(tmp_path / "uninterrupted"))
    assert result.returncode == 0, result.stderr[-3000:]
    process = start(script, *flags, "--output-dir", str(tmp_path / "run"))
    read_until(process, "update 3/")
    process.kill()
    process.wait()
    assert checkpoints(tmp_path / "run")[0] == "update_0000002"
    result = run_script(f"{script}_full.py", *flags, "--output-dir", str(tmp_path / "run"), "--resume")
    assert result.returncode == 0 and "resuming" in result.stdout, result.stderr[-3000:]
    assert_same_run(tmp_path / "uninterrupted", tmp_path / "run")  # metrics, and the adapters bitwise


@pytest.mark.parametrize("flags,message", [
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--merge-lora-on-save"], "--merge-lora-on-save needs --lora-r"),
    (["--lora-r", "4", "--sampler-dtype", "bf16"], "is not supported with --lora-r"),
    (["--lora-r", "4", "--lora-target-modules", "q_proj", "v_proj"], "--lora-target-modules q_proj v_proj: "),
])
def test_bad_lora_flags_get_one_line_and_write_nothing(tmp_path, flags, message):
    output_dir = tmp_path / "run"
    result = run_script("rloo_full.py", "--output-dir", str(output_dir), "--total-episodes", "64", *flags)
    assert_one_line_error(result, message)
    assert not output_dir.exists()

