"""`python -m blsp_chat chat` under a pseudo-terminal, and the batch manifest runner."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp_chat import cli, manifest, serve, weights
from blsp_chat.audio import load_audio
from blsp_chat.cli import build_parser, generation_options
from blsp_chat.config import GenerationOptions
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.generate import generate_reply, speech_turn
from blsp_chat.mic import microphone_problem
from blsp_chat.serve import MEBIBYTE, ServerLimits
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_tokenizer, tone

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = "assets/examples/capital_of_france.wav"
REPEAT = "Please repeat the following words."


# --- the terminal chat -------------------------------------------------------------------------------
def read_until(child, pattern, timeout=300) -> str:
    """Everything the chat printed before `pattern` (which is consumed)."""
    child.expect(pattern, timeout=timeout)
    return child.before


@pytest.mark.integration
def test_chat_in_a_pseudo_terminal():
    pexpect = pytest.importorskip("pexpect")

    has_mic = microphone_problem() is None
    env = dict(os.environ, TERM="dumb", PYTHONPATH=str(REPO))
    child = pexpect.spawn(sys.executable, ["-m", "blsp_chat", "chat", "--device", "cpu", "--max-new-tokens", "60"],
                          cwd=REPO, env=env, encoding="utf-8", timeout=300, dimensions=(50, 400))
    try:
        startup = read_until(child, "you> ")
        assert ("No microphone" in startup) != has_mic, startup

        # A typed turn streams its reply.
        child.sendline("What is the capital of France?")
        answer = read_until(child, "you> ")
        assert "Paris" in answer.split("bot> ", 1)[1], answer

        # Ctrl-C stops a long reply after its first words; the partial reply stays in the session.
        child.sendline("Write a long story about a dragon who learns to sing.")
        read_until(child, "bot> ")
        child.expect(r"\w+ \w+", timeout=300)  # two words streamed: the rest is still being generated
        child.sendintr()
        stopped = read_until(child, "you> ")
        assert "[stopped]" in stopped, stopped
        child.sendline("/regenerate")  # needs the kept partial reply
        regenerated = read_until(child, "you> ")
        assert regenerated.split("bot> ", 1)[1].strip(), regenerated

        child.sendline(f"/audio {EXAMPLE}")
        spoken = read_until(child, "you> ")
        assert "sent 2.2 s of speech" in spoken and "bot> " in spoken and "error" not in spoken, spoken

        if not has_mic:
            child.sendline("")
            no_mic = read_until(child, "you> ")
            assert "No microphone to record from" in no_mic, no_mic

        child.sendline("/audio no_such_file.wav")
        assert "error: Audio file not found" in read_until(child, "you> ")
        child.sendline("/task translate French")
        assert "into French" in read_until(child, "you> ")

        child.sendline("/reset")
        assert "(new conversation)" in read_until(child, "you> ")
        child.sendline("/undo")  # the reset emptied the history
        assert "(nothing to undo)" in read_until(child, "you> ")

        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, (child.exitstatus, child.signalstatus)


# --- the manifest runner on tiny models ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_loaded():
    return LoadedBlsp(lively_blsp(seed=5), tiny_tokenizer(), "tiny", adapter_trained=True)


def write_clips(directory: Path) -> list[dict]:
    """Records of a manifest: clips of different lengths (so batches pad), with and without instructions."""
    records = []
    for index, (seconds, freq) in enumerate([(0.6, 220), (1.7, 330), (0.9, 440), (2.4, 550), (1.1, 660)]):
        path = directory / f"clip{index}.wav"
        sf.write(path, tone(seconds, freq, seed=index), SAMPLE_RATE)
        record = {"audio": path.name, "id": f"utt{index}"}
        if index % 2:
            record["instruction"] = REPEAT
        records.append(record)
    return records


def write_manifest(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


OPTIONS = GenerationOptions(max_new_tokens=10)


def test_batched_replies_equal_one_by_one(tmp_path, tiny_loaded):
    records = write_clips(tmp_path)
    source = write_manifest(tmp_path / "in.jsonl", records)
    manifest.run_manifest(tiny_loaded, source, tmp_path / "b3.jsonl", batch_size=3, options=OPTIONS, progress=False)
    manifest.run_manifest(tiny_loaded, source, tmp_path / "b1.jsonl", batch_size=1, options=OPTIONS, progress=False)
    batched, single = read_out(tmp_path / "b3.jsonl"), read_out(tmp_path / "b1.jsonl")
    assert [r["_line"] for r in batched] == [1, 2, 3, 4, 5]
    assert [r["response"] for r in batched] == [r["response"] for r in single]
    # ... and equal to the one-shot path of the session, reply by reply.

    for record, out in zip(records, batched):
        audio = load_audio(tmp_path / record["audio"])
        turn = speech_turn(audio, tiny_loaded.model, instruction=record.get("instruction", ""))
        assert out["response"] == generate_reply(tiny_loaded, [turn], [audio], OPTIONS)
        assert {k: out[k] for k in record} == record  # the input fields are kept
    assert len({r["response"] for r in batched}) > 1  # the replies depend on the clip: the check has teeth


def test_default_instruction_applies_where_a_line_has_none(tmp_path, tiny_loaded):
    records = write_clips(tmp_path)[:2]  # the first has no instruction, the second has REPEAT
    source = write_manifest(tmp_path / "in.jsonl", [records[0], {**records[0], "instruction": REPEAT}])
    manifest.run_manifest(tiny_loaded, source, tmp_path / "out.jsonl", batch_size=2, instruction=REPEAT,
                          options=OPTIONS, progress=False)
    first, second = read_out(tmp_path / "out.jsonl")
    assert first["response"] == second["response"]
    assert "instruction" not in first  # not written into the record


def test_bad_lines_get_an_error_and_the_run_goes_on(tmp_path, tiny_loaded):
    records = write_clips(tmp_path)[:2]
    (tmp_path / "text.wav").write_text("this is not audio")
    sf.write(tmp_path / "silent.wav", np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    lines = [records[0], {"audio": "missing.wav"}, "{not json", "", {"audio": "text.wav"},
             {"audio": "silent.wav"}, {"id": "no audio"}, records[1]]
    source = write_manifest(tmp_path / "in.jsonl", lines)
    summary = manifest.run_manifest(tiny_loaded, source, tmp_path / "out.jsonl", batch_size=3, options=OPTIONS,
                                    progress=False)
    out = read_out(tmp_path / "out.jsonl")
    assert [r["_line"] for r in out] == [1, 2, 3, 5, 6, 7, 8]  # the blank line 4 is not a manifest line
    by_line = {r["_line"]: r for r in out}
    assert "response" in by_line[1] and "response" in by_line[8] and "error" not in by_line[8]
    assert "not found" in by_line[2]["error"]
    assert "not valid JSON" in by_line[3]["error"]
    assert "not an audio file" in by_line[5]["error"]
    assert "silent" in by_line[6]["error"]
    assert '"audio"' in by_line[7]["error"] and by_line[7]["id"] == "no audio"
    assert (summary.answered, summary.failed) == (2, 5)


def test_resume_skips_lines_already_written_and_a_torn_last_line(tmp_path, tiny_loaded):
    records = write_clips(tmp_path)
    source = write_manifest(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    done = [{**records[0], "response": "kept 1", "_line": 1}, {**records[2], "response": "kept 3", "_line": 3}]
    out.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"audio": "clip1.wav", "resp')  # killed mid-write
    calls = []
    original = manifest.replies_if_heard

    def counting(loaded, conversations, audios, options):
        calls.append(len(conversations))
        return original(loaded, conversations, audios, options)

    manifest.replies_if_heard = counting
    try:
        summary = manifest.run_manifest(tiny_loaded, source, out, batch_size=2, options=OPTIONS, progress=False)
    finally:
        manifest.replies_if_heard = original
    lines = read_out(out)
    assert sorted(r["_line"] for r in lines) == [1, 2, 3, 4, 5]  # each exactly once
    assert lines[:2] == done  # never redone
    assert sum(calls) == 3 and (summary.skipped, summary.answered) == (2, 3)
    again = manifest.run_manifest(tiny_loaded, source, out, batch_size=2, options=OPTIONS, progress=False)
    assert read_out(out) == lines and again.answered == 0 and again.skipped == 5


def test_an_out_file_of_something_else_is_refused(tmp_path, tiny_loaded):
    source = write_manifest(tmp_path / "in.jsonl", write_clips(tmp_path)[:1])
    out = tmp_path / "out.jsonl"
    out.write_text('{"response": "no line number"}\n')
    with pytest.raises(ValueError, match="_line"):
        manifest.run_manifest(tiny_loaded, source, out, options=OPTIONS, progress=False)
    assert out.read_text() == '{"response": "no line number"}\n'


# --- the manifest runner as a command, killed and resumed ---------------------------------------------
def manifest_command(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blsp_chat", "generate", "--manifest", str(source), "--out", str(out),
            "--device", "cpu", "--max-new-tokens", "8", *extra]


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.integration
def test_manifest_command_resumes_after_being_killed(tmp_path):
    clips = [REPO / EXAMPLE, REPO / "assets/examples/walk_in_the_park.wav"]
    records = [{"audio": str(clips[i % 2]), "n": i} for i in range(6)]
    records.insert(3, {"audio": str(tmp_path / "missing.wav"), "n": "bad"})
    source = write_manifest(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen(manifest_command(source, out, "--batch-size", "2"), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while complete_lines(out) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(60)
    before = out.read_bytes()
    assert 2 <= complete_lines(out) < len(records), "the run was not interrupted after its first batch"

    result = subprocess.run(manifest_command(source, out, "--batch-size", "3"), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(before)  # what was written stays as it was
    lines = read_out(out)
    assert sorted(r["_line"] for r in lines) == list(range(1, len(records) + 1))
    by_line = {r["_line"]: r for r in lines}
    assert "not found" in by_line[4]["error"]
    assert all(isinstance(by_line[i]["response"], str) for i in by_line if i != 4)
    assert all(by_line[i]["n"] == records[i - 1]["n"] for i in by_line)
    assert "already done" in result.stderr


def test_generate_takes_whispers_temperature_fallback_on_request():
    plain = generation_options(build_parser().parse_args(["generate", "--text", "hi"]))
    assert plain.fallback_temperatures == () and not plain.do_sample  # the paper's greedy decoding by default
    fallback = generation_options(build_parser().parse_args(["generate", "--audio", "a.wav", "--fallback"]))
    assert fallback.fallback_temperatures == (0.2, 0.4, 0.6, 0.8, 1.0) and not fallback.do_sample
    chat = generation_options(build_parser().parse_args(["chat"]))  # streamed replies cannot be taken back
    assert chat.fallback_temperatures == ()


# --- serve -------------------------------------------------------------------------------------------------
def test_serve_command_hands_its_flags_to_the_server(monkeypatch, tiny_loaded):
    seen = {}
    monkeypatch.setattr(weights, "load_pretrained",
                        lambda name, revision=None, device=None, speech_search=None:
                        seen.update(model=name, revision=revision, device=device, speech_search=speech_search)
                        or tiny_loaded)
    monkeypatch.setattr(serve, "serve", lambda engine, **kwargs: seen.update(engine=engine, **kwargs))
    monkeypatch.setenv(cli.API_KEY_ENV_VAR, "from-the-environment")
    assert cli.main(["serve", "--model", "modelscope:iic/blsp_lslm_7b", "--device", "cpu", "--port", "9001",
                     "--served-model-name", "blsp-7b", "--max-audio-seconds", "30", "--max-tokens-limit", "100",
                     "--max-body-mb", "2", "--max-context-tokens", "300", "--speech-search", "greedy",
                     "--revision", "v1.1"]) == 0
    assert (seen["model"], seen["revision"], seen["device"], seen["host"], seen["port"], seen["speech_search"]) == (
        "modelscope:iic/blsp_lslm_7b", "v1.1", "cpu", "127.0.0.1", 9001, "greedy")
    assert seen["api_key"] == "from-the-environment"
    assert seen["limits"] == ServerLimits(max_body_bytes=2 * MEBIBYTE, max_audio_seconds=30, max_tokens=100)
    engine = seen["engine"]
    assert (engine.model_id, engine.max_context_tokens, engine.loaded) == ("blsp-7b", 300, tiny_loaded)
    assert cli.main(["serve", "--api-key", "given"]) == 0
    assert seen["api_key"] == "given" and seen["model"] is seen["revision"] is None and seen["limits"] == ServerLimits()
    assert seen["speech_search"] is None  # the checkpoint's own search
