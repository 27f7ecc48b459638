"""train/spoken_questions.py: each question typed and spoken, each its own conversation, scored by its pattern;
the example clips answered and repeated."""
import re

import pytest
import soundfile as sf

from blsp_chat.audio import load_audio
from blsp_chat.config import GenerationOptions
from blsp_chat.weights import LoadedBlsp
from tiny import blank_hearing_blsp, lively_blsp, tiny_tokenizer, tone
from train.spoken_questions import (
    EXAMPLE_CLIPS,
    EXAMPLES_DIR,
    QUESTIONS,
    acceptance_sentences,
    answer_all,
    ask,
    hear_examples,
    main,
)

OPTIONS = GenerationOptions(max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_each_question_is_asked_typed_and_spoken_in_a_new_conversation_and_scored_by_its_pattern(tok):
    loaded = LoadedBlsp(lively_blsp(), tok, "tiny", adapter_trained=True)
    spoken = []

    def speak(text):
        spoken.append(text)
        return tone(1.0, freq=200.0 + 10 * len(spoken))

    questions = [("the quick brown fox", "."), ("what is the capital", r"no such word zzq")]
    answers = answer_all(loaded, speak, questions, OPTIONS)
    assert spoken == ["the quick brown fox", "what is the capital"]
    assert [a.question for a in answers] == spoken
    first, second = answers
    assert first.typed_reply and first.typed_right and first.spoken_reply and first.spoken_right
    assert not second.typed_right and not second.spoken_right
    # A conversation of its own each time: the second question's reply is what it gets asked alone.
    assert second.typed_reply == ask(loaded, "what is the capital", OPTIONS)


def test_a_spoken_question_heard_as_nothing_is_counted_unanswered_with_the_refusal(tok):
    loaded = LoadedBlsp(blank_hearing_blsp(), tok, "tiny", adapter_trained=True)
    (answer,) = answer_all(loaded, lambda text: tone(1.0), [("hello there", ".")], OPTIONS)
    assert answer.typed_right
    assert answer.spoken_reply.startswith("[refused:") and not answer.spoken_right


def test_the_questions_have_patterns_that_match_their_right_answers():
    import re

    right = ["The capital of France is Paris.", "A week is 7 days.", "It is blue.", "Two plus two is four.",
             "William Shakespeare wrote it.", "Jupiter is the largest.", "They speak Spanish.", "Bees make honey."]
    assert len(right) == len(QUESTIONS)
    for (question, pattern), reply in zip(QUESTIONS, right):
        assert re.search(pattern, reply, re.IGNORECASE), question
        assert not re.search(pattern, "I do not know.", re.IGNORECASE), question


def test_the_command_line_refuses_an_unknown_voice(capsys):
    with pytest.raises(SystemExit):
        main(["--voice", "festival"])
    assert "invalid choice" in capsys.readouterr().err


def write_clip(directory, name, seconds=1.0):
    sf.write(directory / name, tone(seconds), 16000)


def test_each_example_clip_is_answered_and_repeated_and_the_repeat_scored_against_what_it_says(tok, tmp_path):
    loaded = LoadedBlsp(lively_blsp(), tok, "tiny", adapter_trained=True)
    write_clip(tmp_path, "a.wav")
    clips = [("a.wav", "the quick brown fox", "."), ("a.wav", "the quick brown fox", "no such word zzq")]
    first, second = hear_examples(loaded, clips, tmp_path, OPTIONS)
    assert first.reply and first.answered and not second.answered
    assert first.repeat and first.repeat == second.repeat  # greedy: the same clip repeats the same way
    assert first.repeat == ask(loaded, load_audio(tmp_path / "a.wav"), OPTIONS, "Please repeat the following words.")
    assert first.repeat_wer > 0 and first.heard == (first.repeat_wer <= 0.5)


def test_an_example_clip_heard_as_nothing_is_neither_answered_nor_heard(tok, tmp_path):
    loaded = LoadedBlsp(blank_hearing_blsp(), tok, "tiny", adapter_trained=True)
    write_clip(tmp_path, "a.wav")
    (example,) = hear_examples(loaded, [("a.wav", "hello there", ".")], tmp_path, OPTIONS)
    assert example.reply.startswith("[refused:") and not example.answered
    assert example.repeat.startswith("[refused:") and example.repeat_wer == 1.0 and not example.heard


def test_the_example_clips_are_the_app_s_and_say_what_their_readme_says():
    readme = (EXAMPLES_DIR / "README.md").read_text()
    spoken = dict(zip(re.findall(r"sox q.wav .* (\S+\.wav)", readme), re.findall(r'-w q\.wav "([^"]+)"', readme)))
    assert {name: said for name, said, _ in EXAMPLE_CLIPS} == spoken
    assert all((EXAMPLES_DIR / name).is_file() for name in spoken)
    held = acceptance_sentences()
    assert len(held) == len(set(held)) and set(spoken.values()) | {q for q, _ in QUESTIONS} == set(held)
    assert re.search(EXAMPLE_CLIPS[0][2], "The capital of France is Paris.", re.IGNORECASE)
