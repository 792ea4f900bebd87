"""Failures a long run must handle cleanly (issue #7): a non-finite reward stops the run with a clear message."""

import importlib
import os

import pytest
from conftest import read_metrics


@pytest.mark.parametrize("script", ["rloo", "ppo"])
def test_a_non_finite_score_stops_the_run_before_the_weights_are_touched(monkeypatch, tmp_path, script):
    module = importlib.import_module(script)
    exact = module.reward_scores
    calls = []

    def nan_from_the_second_update(*args, **kwargs):
        scores = exact(*args, **kwargs)
        calls.append(None)
        if len(calls) > 1:  # the tiny preset scores a whole update in one call
            scores[0] = float("nan")
        return scores

    monkeypatch.setattr(module, "reward_scores", nan_from_the_second_update)
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit, match="error: update 2: non-finite score; stopped before the optimizer step.*nothing was saved"):
        module.main(module.parse_args(["--total-episodes", "192", "--output-dir", str(output_dir)]))
    assert [m["update"] for m in read_metrics(output_dir)] == [1]  # update 1 was logged, update 2 never was
    assert not os.path.exists(output_dir / "model.safetensors")  # no policy with NaN weights is saved
