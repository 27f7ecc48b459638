"""train/spoken_questions.py: each question typed and spoken, each its own conversation, scored by its pattern."""
import pytest

from blsp_chat.config import GenerationOptions
from blsp_chat.weights import LoadedBlsp
from tiny import blank_hearing_blsp, lively_blsp, tiny_tokenizer, tone
from train.spoken_questions import QUESTIONS, answer_all, ask, main

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
