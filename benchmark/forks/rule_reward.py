"""A rule in place of the reward model, with no edit to the script (README, "Fork it"):

    python rloo.py --reward-fn benchmark/forks/rule_reward.py:rule_reward --reward-model-path none
"""


def rule_reward(prompts, completions, **columns):
    """A third per word of the post a summary names, less 0.5 per word not in the post and 0.25 per repeated word."""
    scores = []
    for prompt, summary in zip(prompts, completions):
        post, words = set(prompt.split("POST:")[-1].split("TL;DR:")[0].split()), summary.split()
        foreign, repeats = sum(word not in post for word in words), len(words) - len(set(words))
        scores.append(len(set(words) & post) / 3 - 0.5 * foreign - 0.25 * repeats)
    return scores
