"""The tiny world: its gold judge on hand-written cases, and artefacts in the formats of the real ones."""

import pytest
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import tiny_world

PROMPT = "SUBREDDIT: r/pets\n\nTITLE: cat help\n\nPOST: so cat really rent um boss\n\nTL;DR:"


@pytest.fixture(scope="session")
def world():
    return tiny_world.ensure_world()


def test_gold_score_rewards_naming_the_posts_keys_and_nothing_else():
    assert tiny_world.post_keys(PROMPT) == ["cat", "rent", "boss"]
    assert tiny_world.gold_score(PROMPT, "cat rent boss <|endoftext|>") == pytest.approx(1.0)
    assert tiny_world.gold_score(PROMPT, "boss cat rent") == pytest.approx(1.0)  # order does not matter
    assert tiny_world.gold_score(PROMPT, "cat rent") == pytest.approx(2 / 3)
    assert tiny_world.gold_score(PROMPT, "cat so rent boss") == pytest.approx(0.75)  # a filler
    assert tiny_world.gold_score(PROMPT, "cat rent boss dog") == pytest.approx(0.5)  # a key not in the post
    assert tiny_world.gold_score(PROMPT, "cat cat rent boss") == pytest.approx(0.75)  # a repeat
    assert tiny_world.gold_score(PROMPT, "") == 0.0


def test_gold_judge_compares_with_the_reference():
    assert tiny_world.gold_judge(PROMPT, "cat rent boss", "cat rent") == 1.0
    assert tiny_world.gold_judge(PROMPT, "cat rent", "cat boss") == 0.5
    assert tiny_world.gold_judge(PROMPT, "cat um", "cat rent") == 0.0


def test_dataset_has_the_tldr_schema_and_splits(world):
    dataset = load_dataset(world["dataset_name"])
    assert set(dataset) == {"train", "validation", "test"}
    row = dataset["validation"][0]
    assert set(row) == {"id", "prompt", "messages"} and row["prompt"].endswith("TL;DR:")
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["messages"][0]["content"] == row["prompt"]


def test_tokenizer_and_models_load_like_pythias(world):
    tokenizer = AutoTokenizer.from_pretrained(world["sft_model_path"])
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == "[PAD]" and tokenizer.padding_side == "left"
    assert tokenizer("cat rent")["input_ids"] == tokenizer.convert_tokens_to_ids(["cat", "rent"])  # no BOS/EOS added
    policy = AutoModelForCausalLM.from_pretrained(world["sft_model_path"])
    assert policy.config.model_type == "gpt_neox" and policy.get_input_embeddings().num_embeddings > len(tokenizer)
    reward_model = AutoModelForSequenceClassification.from_pretrained(world["reward_model_path"], num_labels=1)
    assert reward_model.score.out_features == 1 and reward_model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.slow
def test_sft_policy_loses_to_the_references_and_the_reward_model_tracks_the_gold_judge(world):
    result = tiny_world.evaluate(world["sft_model_path"], n_prompts=256)
    assert 0.1 < result["gold_win_rate"] < 0.4  # clearly worse than the references, with room to improve
    assert result["reference_gold_score"] > result["gold_score"] + 0.2
