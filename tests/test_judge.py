"""benchmark/judge.py against a fake OpenAI-compatible judge on loopback: verdicts from either side, ties,
garbage, timeouts, retries, resume, and the whole command on the tiny world's policy."""

import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_script

import tiny_world
from benchmark import judge


class FakeJudge(BaseHTTPRequestHandler):
    """Answers from the marker word of the policy's summary ('policy <marker> <n>'), and prefers the summary
    shown first when neither is marked (a real policy's)."""

    requests = {}  # summary -> how many times it was asked

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        a, b = re.search(r"Summary A:\n(.*)\n\nSummary B:\n(.*)\n\nCompare", prompt, re.S).groups()
        if self.headers.get("Authorization") != "Bearer test-key":
            return self.send_error(401)
        policy_letter, other = ("A", "B") if a.startswith("policy") else ("B", "A")
        summary = a if policy_letter == "A" else b
        marker = summary.split()[1] if summary.startswith("policy") else "first"
        FakeJudge.requests[summary] = FakeJudge.requests.get(summary, 0) + 1
        if marker == "flaky" and FakeJudge.requests[summary] == 1:
            return self.send_error(500)
        if marker == "slow":
            time.sleep(5.0)
        if marker == "cut":  # a body cut short: the client sees http.client.IncompleteRead
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"choices": [')
            return
        answer = {"win": f"It is sharper.\nPreferred: {policy_letter}", "lose": f"Too long.\nPreferred: **{other}**",
                  "tie": "Same content.\nPreferred: TIE", "garbage": "Both are lovely summaries!",
                  "flaky": f"Preferred: {policy_letter}", "slow": f"Preferred: {policy_letter}",
                  "first": "The first one.\nPreferred: A"}[marker]
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_judge(monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "test-key")
    FakeJudge.requests = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)  # loopback only
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def judge_args(base_url, **overrides):
    return judge.Args(policy="unused", judge_model="fake", base_url=base_url, api_key_env="FAKE_JUDGE_KEY",
                      num_workers=4, max_attempts=2, timeout=2.0, retry_delay=0.01, **overrides)


def items(markers):
    return [{"id": str(i), "post": f"post {i}", "summary": f"policy {m} {i}", "reference": "reference"}
            for i, m in enumerate(markers)]


def test_verdicts_are_from_the_policys_side_whichever_place_it_is_shown_in(fake_judge, tmp_path):
    markers = ["win"] * 12 + ["lose"] * 12 + ["tie"] * 4
    records = judge.judge_all(judge_args(fake_judge), items(markers), str(tmp_path / "j.jsonl"))
    by_marker = {m: [r for r in records if r["summary"].split()[1] == m] for m in set(markers)}
    assert {r["policy_shown_as"] for r in by_marker["win"]} == {"A", "B"}  # the order really is random
    assert {r["policy_shown_as"] for r in by_marker["lose"]} == {"A", "B"}
    assert [r["verdict"] for r in by_marker["win"]] == [1.0] * 12
    assert [r["verdict"] for r in by_marker["lose"]] == [0.0] * 12
    assert [r["verdict"] for r in by_marker["tie"]] == [0.5] * 4
    result = judge.report(records)
    assert result["win_rate"] == pytest.approx(14 / 28) and result["judged"] == 28 and result["failed"] == 0
    # 12 wins, 12 losses, 4 ties: sample std sqrt(24 * 0.25 / 27), half-width 1.96 * std / sqrt(28).
    half = 1.96 * (6 / 27) ** 0.5 / 28**0.5
    assert result["ci95"] == pytest.approx([0.5 - half, 0.5 + half])


def test_failures_are_retried_then_counted_never_dropped(fake_judge, tmp_path):
    path = str(tmp_path / "j.jsonl")
    markers = ["win", "garbage", "slow", "flaky", "cut"]
    records = judge.judge_all(judge_args(fake_judge), items(markers), path)
    win, garbage, slow, flaky, cut = records
    assert win["verdict"] == 1.0 and win["attempts"] == 1
    assert garbage["verdict"] is None and garbage["attempts"] == 2 and "Preferred" in garbage["error"]
    assert slow["verdict"] is None and slow["attempts"] == 2 and "timed out" in slow["error"]
    assert flaky["verdict"] == 1.0 and flaky["attempts"] == 2  # an HTTP 500, then an answer
    assert cut["verdict"] is None and cut["attempts"] == 2 and "IncompleteRead" in cut["error"]
    result = judge.report(records)
    assert result["judged"] == 2 and result["failed"] == 3 and result["win_rate"] == 1.0
    assert len(result["failures"]) == 3

    # A rerun resumes: only the failures are asked again; a judgement of other summaries is not reused.
    asked_before = dict(FakeJudge.requests)
    again = judge.judge_all(judge_args(fake_judge), items(markers), path)
    asked = {s: n - asked_before.get(s, 0) for s, n in FakeJudge.requests.items()}
    assert asked == {"policy win 0": 0, "policy garbage 1": 2, "policy slow 2": 2, "policy flaky 3": 0, "policy cut 4": 2}
    assert [r["verdict"] for r in again] == [1.0, None, None, 1.0, None]
    changed = items(["win"])
    changed[0]["summary"] = "policy win changed"
    (rejudged,) = judge.judge_all(judge_args(fake_judge), changed, path)
    assert rejudged["summary"] == "policy win changed" and FakeJudge.requests["policy win changed"] == 1


def test_a_missing_key_is_refused_by_the_server_and_reported(fake_judge, tmp_path, monkeypatch):
    monkeypatch.delenv("FAKE_JUDGE_KEY")
    (record,) = judge.judge_all(judge_args(fake_judge), items(["win"]), str(tmp_path / "j.jsonl"))
    assert record["verdict"] is None and "401" in record["error"] and record["attempts"] == 1  # no retry on 4xx


@pytest.mark.slow
def test_judge_command_generates_judges_and_reports_on_the_tiny_policy(fake_judge, tmp_path):
    # The policy's summaries carry no marker, so the fake judge prefers whichever summary it is shown first:
    # the win rate must equal the share of prompts where the policy's summary was shown first.
    world = tiny_world.ensure_world()
    output_dir = tmp_path / "judge"
    result = run_script("benchmark/judge.py", "--policy", world["sft_model_path"], "--dataset-name",
                        world["dataset_name"], "--split", "validation", "--num-prompts", "7", "--response-length", "8",
                        "--judge-model", "fake", "--base-url", fake_judge, "--api-key-env", "FAKE_JUDGE_KEY",
                        "--max-attempts", "1", "--output-dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in open(output_dir / "summaries.jsonl")]
    assert len(summaries) == 7 and all(s["reference"] and s["post"].endswith("TL;DR:") for s in summaries)
    saved = json.load(open(output_dir / "result.json"))
    assert saved["judged"] == 7 and saved["failed"] == 0 and saved["length_unit"] == "tokens"
    # 7 prompts cannot split evenly, so a side mix-up would show: the win rate would be 1 - the share.
    assert saved["policy_shown_first"] != 0.5
    assert saved["win_rate"] == pytest.approx(saved["policy_shown_first"]) and "win rate" in result.stdout
    judgements = [json.loads(line) for line in open(output_dir / "judgements.jsonl")]
    assert sorted(j["id"] for j in judgements) == sorted(s["id"] for s in summaries)


@pytest.mark.slow
def test_judge_command_on_the_pythia_code_path_resumes_and_refuses_other_settings(fake_judge, pythia_like, tmp_path):
    # Pythia's tokenizer has no pad token and EOS id 0; the dataset has the real schema.
    output_dir = tmp_path / "judge"
    flags = ["--policy", pythia_like["sft_model_path"], "--dataset-name", pythia_like["dataset_name"],
             "--num-prompts", "5", "--response-length", "6", "--judge-model", "fake", "--base-url", fake_judge,
             "--api-key-env", "FAKE_JUDGE_KEY", "--output-dir", str(output_dir)]
    (tmp_path / "tok").mkdir()
    import shutil

    for name in os.listdir(pythia_like["tokenizer_path"]):  # the random policy's directory lacks a tokenizer
        shutil.copy(os.path.join(pythia_like["tokenizer_path"], name), pythia_like["sft_model_path"])
    result = run_script("benchmark/judge.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.load(open(output_dir / "result.json"))["judged"] == 5
    asked = sum(FakeJudge.requests.values())
    again = run_script("benchmark/judge.py", *flags)  # everything judged already: nothing is asked
    assert again.returncode == 0 and "reusing 5 summaries" in again.stdout and sum(FakeJudge.requests.values()) == asked
    other = run_script("benchmark/judge.py", *flags[:-2], "--temperature", "0.7", "--output-dir", str(output_dir))
    assert other.returncode != 0 and "--temperature 0.0 -> 0.7" in other.stderr.splitlines()[-1]
