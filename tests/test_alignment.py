"""train.analyze_alignment: cosine tables on constructed hidden states, last-token extraction on the
tiny model, and the t-SNE plot."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny import tiny_blsp, tiny_tokenizer, tone
from train import analyze_alignment as aa
from train.eval_run import LlmRunner, Request

CODES = ["CW", "SA", "SR", "ST"]


def test_row_cosines_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [0.0, 0.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0], [1.0, 0.0]])
    assert aa.row_cosines(a, b) == pytest.approx([0.0, 1.0, -1.0, 0.0])


def _states(speech_fn, text_fn, n=5, d=6, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    return {("speech", c): speech_fn(base, i) for i, c in enumerate(CODES)} | \
           {("text", c): text_fn(base, i) for i, c in enumerate(CODES)}


def test_speech_collapsed_across_instructions_gives_ones_and_low_pairing():
    """Figure 1 / Tables 7-8: speech ignores the instruction and sits apart from text."""
    def speech(base, i):
        return np.tile([1.0, 0, 0, 0, 0, 0], (len(base), 1))

    def text(base, i):
        out = base + i
        out[:, 0] = 0.0  # orthogonal to the speech vector
        return out
    states = _states(speech, text)
    assert aa.cross_instruction_similarity(states, CODES) == pytest.approx(np.ones((4, 4)))
    assert aa.paired_similarity(states, CODES) == pytest.approx({c: 0.0 for c in CODES}, abs=1e-12)


def test_aligned_speech_gives_high_pairing_and_distinct_instructions():
    """Figure 3 / Tables 12-13: speech follows its transcript, and instructions separate it."""
    directions = np.eye(6)[:4]

    def text(base, i):
        return np.tile(directions[i], (len(base), 1))

    def speech(base, i):
        return 2.0 * text(base, i)  # same direction, other scale: cosine 1
    states = _states(speech, text)
    assert aa.paired_similarity(states, CODES) == pytest.approx({c: 1.0 for c in CODES})
    assert aa.cross_instruction_similarity(states, CODES) == pytest.approx(np.eye(4))
    result = aa.analyze(states, CODES)
    assert result["paired_mean"] == pytest.approx(1.0) and result["items"] == 5


def test_cross_instruction_is_a_mean_over_items():
    states = {("speech", "A"): np.array([[1.0, 0.0], [1.0, 0.0]]), ("speech", "B"): np.array([[1.0, 0.0], [0.0, 1.0]])}
    assert aa.cross_instruction_similarity(states, ["A", "B"]) == pytest.approx(np.array([[1.0, 0.5], [0.5, 1.0]]))


def test_markdown_report_lays_out_both_tables():
    paired = {c: 0.5 for c in CODES}
    report = aa.markdown_report(paired, {"speech": np.eye(4)}, CODES)
    assert "| 0.500 | 0.500 | 0.500 | 0.500 |" in report
    assert "| CW-S | 1.000 | 0.000 | 0.000 | 0.000 |" in report


@pytest.fixture(scope="module")
def tiny_runner():
    return LlmRunner(SimpleNamespace(model=tiny_blsp(), tokenizer=tiny_tokenizer(), adapter_trained=False))


def test_last_token_state_is_the_prompts_last_position_despite_left_padding(tiny_runner):
    requests = [Request("Please repeat the following words.", audio=tone(1.2)),
                Request("Hi", text="the quick brown fox"),
                Request("Please repeat.", audio=tone(0.4, 330, seed=2))]
    together = aa.last_token_states(tiny_runner, requests)
    for row, request in enumerate(requests):
        inputs = tiny_runner.batch_inputs([request])  # one prompt: no padding
        with torch.no_grad():
            out = tiny_runner.model(**inputs, output_hidden_states=True)
        assert together[row] == pytest.approx(out.hidden_states[-1][0, -1].numpy(), abs=1e-4)
    assert not np.allclose(together[0], together[2])  # different inputs, different states


def test_extract_covers_every_modality_and_instruction(tiny_runner):
    pairs = [(tone(0.5 + 0.2 * i, 200 + 40 * i, seed=i), f"hello there {i}") for i in range(3)]
    states = aa.extract(tiny_runner, pairs, {c: aa.INSTRUCTIONS[c] for c in CODES[:2]}, batch_size=2)
    assert set(states) == {(m, c) for m in aa.MODALITIES for c in CODES[:2]}
    assert all(v.shape == (3, tiny_runner.model.llama_model.config.hidden_size) for v in states.values())
    assert not np.allclose(states["text", "CW"], states["text", "SA"])  # the instruction matters


def test_tsne_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    states = {(m, c): rng.standard_normal((5, 8)) for m in aa.MODALITIES for c in CODES}
    aa.tsne_plot(states, CODES, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_centring_removes_a_shared_component():
    """A common offset makes unrelated vectors look alike; centring undoes it."""
    rng = np.random.default_rng(1)
    offset = 100 * np.ones(6)
    states = {(m, c): rng.standard_normal((8, 6)) + offset for m in aa.MODALITIES for c in CODES}
    result = aa.analyze(states, CODES)
    assert result["paired_mean"] > 0.99
    assert abs(result["centred"]["paired_mean"]) < 0.3
