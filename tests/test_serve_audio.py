"""The server's audio surface (issue 32), driven by the official `openai` client on 127.0.0.1: spoken replies from
chat completions (`modalities: ["text", "audio"]`, whole and streamed), `/v1/audio/speech`, the transcription
formats, and the refusal of every parameter the server cannot honour.

Unit tests run the tiny in-memory model (or a scripted engine that replies in plain English) with the real piper
voice; the integration tests have Whisper tiny.en hear the speech back, once for a scripted reply through every
route and once for the real default model answering a spoken question.
"""
import base64
import io

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from test_serve import (
    CONTEXT,
    EXAMPLE,
    LIMITS,
    MAX_TOKENS,
    MODEL,
    TYPED,
    audio_part,
    chat,
    expected,
    make_client,
    running,
)

from blsp_chat import cli, serve
from blsp_chat.audio import load_audio, resample
from blsp_chat.constants import SAMPLE_RATE
from blsp_chat.serve import (
    CHAT_AUDIO_FORMATS,
    MEDIA_TYPES,
    OUTPUT_SAMPLE_RATE,
    SPEECH_FORMATS,
    InProcessEngine,
    ServerVoice,
    create_app,
    load_server_voice,
)
from blsp_chat.session import ReplyChunk
from blsp_chat.voice import tts
from blsp_chat.weights import LoadedBlsp
from tiny import lively_blsp, tiny_tokenizer, tone

SPOKEN = {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
# Not "France is": Whisper tiny.en hears piper say it as "Francis" every time (at the voice's own rate too), a
# homophone that is no fault of the audio path under test.
SCRIPT = ("The city of Paris is the capital of France. It is famous for the Eiffel Tower and its museums. "
          "Many people visit the city every year.")
FIRST_SENTENCE = "The city of Paris is the capital of France."
SENTENCE = "The quick brown fox jumps over the lazy dog."
MIN_SPEECH_SECONDS = 0.2  # any spoken word takes longer
MAX_WER = 0.10


# --- servers ---------------------------------------------------------------------------------------------------
class ScriptedReply:
    """A ReplyStream that streams `text` word by word, then ends as at EOS."""

    def __init__(self, text: str):
        words = text.split(" ")
        self.pieces = [w + " " for w in words[:-1]] + [words[-1]]
        self.prompt_tokens = 5

    def __iter__(self):
        for i, piece in enumerate(self.pieces):
            yield ReplyChunk(piece, "".join(self.pieces[: i + 1]))
        yield ReplyChunk("", "".join(self.pieces), done=True, stopped_by="eos")

    def completion_tokens(self) -> int:
        return len(self.pieces)

    def close(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class ScriptedEngine:
    """Replies SCRIPT to any conversation: plain English whose speech can be checked against its words."""

    model_id = MODEL

    def start(self, turns, options, seed=None) -> ScriptedReply:
        return ScriptedReply(SCRIPT)


@pytest.fixture(scope="module")
def voice():
    try:
        return tts.load_voice(tts.VoiceOptions(engine="piper", threads=1))
    except tts.VoiceUnavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def loaded():
    return LoadedBlsp(lively_blsp(seed=3), tiny_tokenizer(), "tiny", adapter_trained=True)


@pytest.fixture(scope="module")
def url(loaded, voice):
    engine = InProcessEngine(loaded, MODEL, max_context_tokens=CONTEXT)
    with running(create_app(engine, limits=LIMITS, voice=voice)) as base:
        yield base


@pytest.fixture(scope="module")
def scripted_url(voice):
    with running(create_app(ScriptedEngine(), limits=LIMITS, voice=voice)) as base:
        yield base


@pytest.fixture(scope="module")
def voiceless_url(loaded):
    with running(create_app(InProcessEngine(loaded, MODEL, max_context_tokens=CONTEXT), limits=LIMITS)) as base:
        yield base


@pytest.fixture
def client(url):
    return make_client(url)


# --- what came back --------------------------------------------------------------------------------------------
def decoded(data: bytes, fmt: str) -> np.ndarray:
    """Audio bytes in an OpenAI format -> float32 samples at OUTPUT_SAMPLE_RATE."""
    if fmt in ("pcm", "pcm16"):
        assert len(data) % 2 == 0, "whole 16-bit samples"
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768
    return resample(load_audio(data), SAMPLE_RATE, OUTPUT_SAMPLE_RATE)


def seconds(samples: np.ndarray) -> float:
    return len(samples) / OUTPUT_SAMPLE_RATE


def assert_speech(samples: np.ndarray) -> None:
    assert seconds(samples) > MIN_SPEECH_SECONDS and np.sqrt(np.mean(samples ** 2)) > 0.01, "audible speech"


def streamed(client, **kwargs) -> tuple[list, list[dict]]:
    """A streamed spoken reply's chunks, and its audio deltas in order (as dicts of the fields they carry)."""
    chunks = list(chat(client, TYPED, stream=True, modalities=["text", "audio"],
                       audio={"voice": "alloy", "format": "pcm16"}, **kwargs))
    audio = [c.choices[0].delta.audio.model_dump(exclude_none=True) for c in chunks
             if c.choices and c.choices[0].delta.audio is not None]
    return chunks, audio


def joined(audio_deltas: list[dict], field: str) -> str:
    return "".join(d.get(field, "") for d in audio_deltas)


# --- chat completions with a spoken reply ---------------------------------------------------------------------
def test_a_spoken_reply_carries_its_audio_and_transcript(client, voice):
    text_only = chat(client, TYPED)
    response = chat(client, TYPED, **SPOKEN)
    message = response.choices[0].message
    assert message.content is None, "as OpenAI's: the text is the audio's transcript"
    assert message.audio.transcript == text_only.choices[0].message.content
    assert message.audio.id.startswith("audio_") and isinstance(message.audio.expires_at, int)
    assert response.choices[0].finish_reason == text_only.choices[0].finish_reason
    assert response.usage == text_only.usage
    samples, rate = sf.read(io.BytesIO(base64.b64decode(message.audio.data)), dtype="float32")
    assert rate == OUTPUT_SAMPLE_RATE and samples.ndim == 1
    assert_speech(samples)
    # The voice said this transcript: as long as the voice takes to say it (piper's timing noise aside).
    direct = ServerVoice(voice).speak_all(message.audio.transcript)
    assert abs(seconds(samples) - seconds(direct)) < 0.25 * seconds(direct)


@pytest.mark.parametrize("fmt", list(CHAT_AUDIO_FORMATS))
def test_each_chat_audio_format_decodes(client, fmt):
    response = chat(client, TYPED, modalities=["text", "audio"], audio={"voice": "echo", "format": fmt})
    message = response.choices[0].message
    assert_speech(decoded(base64.b64decode(message.audio.data), fmt))


def test_a_streamed_spoken_reply_sends_transcript_and_samples_as_openai_does(client):
    whole = chat(client, TYPED, **SPOKEN)
    chunks, audio = streamed(client, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not any(c.choices and c.choices[0].delta.content for c in chunks), "the text comes as the transcript"
    assert joined(audio, "transcript") == whole.choices[0].message.audio.transcript
    assert len([d for d in audio if "transcript" in d]) > 2, "the transcript comes in pieces"
    assert [i for i, d in enumerate(audio) if "id" in d] == [0], "the id once (the client's accumulator joins strings)"
    assert audio[-1] == {"expires_at": audio[-1]["expires_at"]}, "the last audio update holds only its expiry"
    pieces = [base64.b64decode(d["data"], validate=True) for d in audio if "data" in d]
    assert all(len(p) % 3 == 0 for p in pieces[:-1]), "pieces join into one valid base64 string"
    samples = decoded(base64.b64decode(joined(audio, "data"), validate=True), "pcm16")
    assert_speech(samples)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_a_streamed_reply_is_spoken_sentence_by_sentence(scripted_url):
    """The first sentence's samples are sent before the second sentence's words: a client can play it at once."""
    _, audio = streamed(make_client(scripted_url))
    first_data = next(i for i, d in enumerate(audio) if "data" in d)
    transcript_before = joined(audio[:first_data], "transcript")
    assert transcript_before.startswith(FIRST_SENTENCE) and "Eiffel" not in transcript_before
    assert len([d for d in audio if "data" in d]) >= 3, "one piece of samples per sentence"
    assert joined(audio, "transcript") == SCRIPT


def test_a_spoken_reply_sent_back_continues_the_conversation(client, loaded):
    """The client appends the message it got (content null, audio with its transcript); the server reads the
    transcript, since it keeps no audio between requests."""
    message = chat(client, TYPED, **SPOKEN).choices[0].message
    follow_up = {"role": "user", "content": "tell me more"}
    reply = chat(client, [*TYPED, message.model_dump(exclude_none=True), follow_up])
    want, _ = expected(loaded, [("text", TYPED[0]["content"]), ("reply", message.audio.transcript),
                                ("text", follow_up["content"])])
    assert reply.choices[0].message.content == want


def test_neutral_values_of_unused_fields_are_accepted(client):
    plain = chat(client, TYPED).choices[0].message.content
    same = chat(client, TYPED, frequency_penalty=0, presence_penalty=0.0, user="someone", metadata={"k": "v"},
                response_format={"type": "text"}, modalities=["text"], store=False, tool_choice="none")
    assert same.choices[0].message.content == plain


# --- /v1/audio/speech ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", SPEECH_FORMATS)
def test_speech_in_each_format(client, fmt):
    response = client.audio.speech.create(model="tts-1", voice="nova", input=SENTENCE, response_format=fmt)
    assert response.response.headers["content-type"] == MEDIA_TYPES[fmt]
    samples = decoded(response.content, fmt)
    assert_speech(samples)
    assert 1.0 < seconds(samples) < 6.0, "a nine-word sentence"


def test_speech_defaults_to_mp3_and_answers_to_the_served_model_too(client):
    response = client.audio.speech.create(model=MODEL, voice="onyx", input=SENTENCE)
    assert response.response.headers["content-type"] == "audio/mpeg"
    assert_speech(decoded(response.content, "mp3"))


def test_speech_speed_is_honoured_by_the_voice(client):
    def length(speed: float) -> float:
        data = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm",
                                          speed=speed).content
        return seconds(decoded(data, "pcm"))

    slow, normal, fast = length(0.5), length(1.0), length(2.0)
    assert slow > 1.5 * normal and normal > 1.5 * fast, (slow, normal, fast)


def test_espeak_honours_speed_too():
    """The other engine a server may speak with: speed is its words per minute."""
    try:
        voice = tts.load_voice(tts.VoiceOptions(engine="espeak-ng"))
    except tts.VoiceUnavailable as err:
        pytest.skip(str(err))
    assert len(voice.synthesize(SENTENCE, 2.0)) < 0.7 * len(voice.synthesize(SENTENCE))
    with pytest.raises(ValueError, match="speed must be positive"):
        voice.synthesize(SENTENCE, 0.0)


# --- transcriptions ----------------------------------------------------------------------------------------------
CLIP_SECONDS = 1.5


@pytest.fixture(scope="module")
def clip() -> bytes:
    out = io.BytesIO()
    sf.write(out, tone(CLIP_SECONDS, freq=260), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return out.getvalue()


def transcribe(client, clip: bytes, **kwargs):
    return client.audio.transcriptions.create(model=MODEL, file=("clip.wav", clip), **kwargs)


def test_transcription_formats_agree(client, clip):
    text = transcribe(client, clip).text
    assert text and "\n" not in text
    assert transcribe(client, clip, response_format="text") == text
    verbose = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["segment"])
    assert (verbose.text, verbose.duration, verbose.language) == (text, CLIP_SECONDS, "english")
    [segment] = verbose.segments
    assert (segment.id, segment.start, segment.end, segment.text, segment.temperature) == (0, 0.0, CLIP_SECONDS,
                                                                                          text, 0.0)
    assert segment.compression_ratio > 0
    assert transcribe(client, clip, response_format="srt") == f"1\n00:00:00,000 --> 00:00:01,500\n{text}\n"
    assert transcribe(client, clip, response_format="vtt") == f"WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n{text}\n"


def test_the_timestamps_of_srt_and_vtt():
    assert serve.timestamp(3725.0426, ",") == "01:02:05,043" and serve.timestamp(59.9996, ".") == "00:01:00.000"


# --- what the server cannot honour -------------------------------------------------------------------------------
BAD_CHATS = {
    "unsupported voice": ({"audio": {"voice": "nobody", "format": "wav"}}, 400, "invalid_value", "audio.voice"),
    "custom voice": ({"audio": {"voice": {"id": "voice_1234"}, "format": "wav"}}, 400, "invalid_value", "audio.voice"),
    "unsupported format": ({"audio": {"voice": "alloy", "format": "ogg"}}, 400, "invalid_value", "audio.format"),
    "streamed wav": ({"stream": True}, 400, "unsupported_value", "audio.format"),
    "audio without the modality": ({"modalities": None}, 400, "invalid_value", "audio"),
    "the modality without audio": ({"audio": None}, 400, "missing_required_parameter", "audio"),
    "no format": ({"audio": {"voice": "alloy"}}, 400, "missing_required_parameter", "audio.format"),
    "an unknown audio field": ({"audio": {"voice": "alloy", "format": "wav", "speed": 2}}, 400, "unknown_parameter",
                               "audio.speed"),
    "an image modality": ({"modalities": ["text", "image"]}, 400, "invalid_value", "modalities"),
    "an unknown argument": ({"extra_body": {"top_k": 5}}, 400, "unknown_parameter", "top_k"),
    "a penalty": ({"frequency_penalty": 0.5}, 400, "unsupported_parameter", "frequency_penalty"),
    "json mode": ({"response_format": {"type": "json_object"}}, 400, "unsupported_parameter", "response_format"),
    "a stored completion": ({"store": True}, 400, "unsupported_parameter", "store"),
    "an earlier reply by audio id": ({"messages": [*TYPED, {"role": "assistant", "audio": {"id": "audio_1"}}, *TYPED]},
                                     400, "invalid_value", "messages[1].audio"),
}


def assert_openai_error(error: openai.APIStatusError, status: int, code: str, param: str | None) -> None:
    assert (error.status_code, error.code, error.param) == (status, code, param), error.body
    assert set(error.body) == {"message", "type", "param", "code"} and error.message
    assert error.type == "invalid_request_error"


@pytest.mark.parametrize("name", list(BAD_CHATS))
def test_a_chat_request_the_server_cannot_honour_is_refused(client, name):
    changes, status, code, param = BAD_CHATS[name]
    request = {"model": MODEL, "messages": TYPED, "max_tokens": MAX_TOKENS, **SPOKEN}
    request.update(changes)
    request = {key: value for key, value in request.items() if value is not None}
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(**request)
    assert_openai_error(caught.value, status, code, param)
    assert chat(client, TYPED, **SPOKEN).choices[0].message.audio.data, "the next request is answered"


BAD_SPEECH = {
    "unsupported voice": ({"voice": "nobody"}, 400, "invalid_value", "voice"),
    "unsupported format": ({"response_format": "ogg"}, 400, "invalid_value", "response_format"),
    "too fast": ({"speed": 5.0}, 400, "invalid_value", "speed"),
    "instructions": ({"instructions": "Speak like a pirate."}, 400, "unsupported_parameter", "instructions"),
    "server-sent events": ({"stream_format": "sse"}, 400, "unsupported_value", "stream_format"),
    "nothing to say": ({"input": " ... "}, 400, "invalid_value", "input"),
    "too long": ({"input": "word " * 1000}, 400, "invalid_value", "input"),
    "unknown model": ({"model": "gpt-9-tts"}, 404, "model_not_found", "model"),
    "an unknown argument": ({"extra_body": {"pitch": 2}}, 400, "unknown_parameter", "pitch"),
}


@pytest.mark.parametrize("name", list(BAD_SPEECH))
def test_a_speech_request_the_server_cannot_honour_is_refused(client, name):
    changes, status, code, param = BAD_SPEECH[name]
    with pytest.raises(openai.APIStatusError) as caught:
        client.audio.speech.create(**{"model": "tts-1", "voice": "alloy", "input": SENTENCE, **changes})
    assert_openai_error(caught.value, status, code, param)
    assert client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE).content, "the next is answered"


BAD_TRANSCRIPTIONS = {
    "unsupported response_format": ({"response_format": "diarized_json"}, "invalid_value", "response_format"),
    "a prompt": ({"prompt": "Hello."}, "unsupported_parameter", "prompt"),
    "another language": ({"language": "fr"}, "unsupported_value", "language"),
    "word timestamps": ({"response_format": "verbose_json", "timestamp_granularities": ["word"]},
                        "unsupported_parameter", "timestamp_granularities[]"),
    "timestamps without verbose_json": ({"timestamp_granularities": ["segment"]}, "invalid_value",
                                        "timestamp_granularities[]"),
    "logprobs": ({"include": ["logprobs"]}, "unsupported_parameter", "include[]"),
    "an unknown argument": ({"extra_body": {"diarize": "true"}}, "unknown_parameter", "diarize"),
}


@pytest.mark.parametrize("name", list(BAD_TRANSCRIPTIONS))
def test_a_transcription_request_the_server_cannot_honour_is_refused(client, clip, name):
    changes, code, param = BAD_TRANSCRIPTIONS[name]
    with pytest.raises(openai.APIStatusError) as caught:
        transcribe(client, clip, **changes)
    assert_openai_error(caught.value, 400, code, param)
    assert transcribe(client, clip).text, "the next request is answered"


def test_a_server_without_a_voice_refuses_to_speak_and_goes_on(voiceless_url):
    client = make_client(voiceless_url)
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, TYPED, **SPOKEN)
    assert_openai_error(caught.value, 400, "unsupported_value", "modalities")
    assert "no voice" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE)
    assert_openai_error(caught.value, 404, "model_not_found", "model")
    assert chat(client, TYPED).choices[0].message.content, "text replies go on"


def test_health_says_only_ok(url):
    response = httpx.get(url.removesuffix("/v1") + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


# --- the serve command's voice -------------------------------------------------------------------------------------
@pytest.fixture
def no_voice(monkeypatch):
    """Neither piper's voice nor espeak-ng can be found."""
    monkeypatch.setattr(tts, "piper_voice_packages", lambda: {})
    monkeypatch.setattr(tts.shutil, "which", lambda name: None)


def test_a_voice_asked_for_by_name_must_load(no_voice, capsys):
    with pytest.raises(ValueError, match=r"the server's voice \(piper\) cannot load: piper or its voice"):
        load_server_voice(tts.VoiceOptions(engine="piper"))
    assert load_server_voice(tts.VoiceOptions()) is None, "auto: text only"
    assert "no voice for spoken replies" in capsys.readouterr().err
    assert load_server_voice(None) is None


@pytest.mark.parametrize("flags, engine", [([], "auto"), (["--voice", "espeak-ng"], "espeak-ng"),
                                           (["--voice", "none"], None)])
def test_serve_command_hands_its_voice_to_the_server(monkeypatch, loaded, flags, engine):
    seen = {}
    monkeypatch.setattr(cli.weights, "load_pretrained", lambda *args, **kwargs: loaded)
    monkeypatch.setattr(serve, "serve", lambda engine, **kwargs: seen.update(kwargs))
    assert cli.main(["serve", *flags]) == 0
    assert seen["voice"] == (None if engine is None else tts.VoiceOptions(engine=engine))


# --- heard back by Whisper -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper(whisper_tiny_en_dir):
    from train.eval_run import WhisperTranscriber

    return WhisperTranscriber(str(whisper_tiny_en_dir))


def heard_wer(whisper, samples: np.ndarray, text: str) -> tuple[float, str]:
    from train.metrics import EnglishNormalizer, word_errors

    heard = whisper([resample(samples, OUTPUT_SAMPLE_RATE, SAMPLE_RATE)])[0]
    return word_errors(text, heard, EnglishNormalizer()).wer, heard


def spoken_three_ways(client, model: str, messages: list, max_tokens: int) -> dict[str, tuple[np.ndarray, str]]:
    """A reply's speech and transcript from a whole reply (wav), a streamed one (pcm16), and /v1/audio/speech (mp3)
    of the whole reply's transcript."""
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                           modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    audio = whole.choices[0].message.audio
    chunks = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                            modalities=["text", "audio"], audio={"voice": "shimmer", "format": "pcm16"})
    deltas = [c.choices[0].delta.audio.model_dump(exclude_none=True) for c in chunks
              if c.choices and c.choices[0].delta.audio is not None]
    speech = client.audio.speech.create(model="tts-1", voice="coral", input=audio.transcript)
    return {"chat": (decoded(base64.b64decode(audio.data), "wav"), audio.transcript),
            "streamed chat": (decoded(base64.b64decode(joined(deltas, "data")), "pcm16"), joined(deltas, "transcript")),
            "speech": (decoded(speech.content, "mp3"), audio.transcript)}


@pytest.mark.integration
def test_whisper_hears_every_route_say_the_reply(scripted_url, whisper):
    for route, (samples, transcript) in spoken_three_ways(make_client(scripted_url), MODEL, TYPED, 64).items():
        assert transcript == SCRIPT
        wer, heard = heard_wer(whisper, samples, transcript)
        assert wer <= MAX_WER, (route, heard)


@pytest.mark.integration
def test_the_default_model_answers_aloud(default_blsp, voice, whisper):
    """Speech in, speech out: the example clip asks for France's capital and the answer, spoken, says Paris (its
    six words are "The capital of France is Paris.", which Whisper hears as "... Francis Paris": see SCRIPT). A
    typed request for a longer reply is heard back word for word from every route."""
    question = [{"role": "user", "content": [audio_part(EXAMPLE.read_bytes())]}]
    typed = [{"role": "user", "content": "Describe a good breakfast."}]
    with running(create_app(InProcessEngine(default_blsp, "blsp-chat"), voice=voice)) as base:
        client = make_client(base)
        with client.chat.completions.stream(model="blsp-chat", messages=question, max_tokens=48,
                                            modalities=["text", "audio"],
                                            audio={"voice": "alloy", "format": "pcm16"}) as stream:
            answer = stream.get_final_completion().choices[0].message.audio  # the client's accumulator reads it
        spoken = spoken_three_ways(client, "blsp-chat", typed, 64)
    assert "Paris" in answer.transcript, answer.transcript
    samples = decoded(base64.b64decode(answer.data, validate=True), "pcm16")
    assert "paris" in heard_wer(whisper, samples, answer.transcript)[1].lower()
    assert spoken["streamed chat"][1] == spoken["chat"][1], "greedy: the same reply, streamed"
    assert len(spoken["chat"][1].split()) >= 10, spoken["chat"][1]
    for route, (samples, transcript) in spoken.items():
        wer, heard = heard_wer(whisper, samples, transcript)
        assert wer <= MAX_WER, (route, transcript, heard)
