"""`blsp-chat app|chat|generate|serve|download` (or `python -m blsp_chat ...`): the model from a terminal, in a
browser, or served to programs. The core install runs chat, generate and download; app and serve need their
extras (`pip install 'blsp-chat[app]'`, `[serve]`), and without them say so."""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import soundfile as sf

from . import __version__, manifest, offline, weights
from .audio import DEFAULT_MAX_AUDIO_SECONDS, AudioError, load_audio
from .config import GenerationOptions
from .constants import DEFAULT_TRANSLATION_TARGET, FALLBACK_TEMPERATURES, SAMPLE_RATE, TASK_PRESETS
from .generate import generate_reply, speech_turn
from .mic import MicrophoneUnavailable, Player, Recorder, microphone_problem  # sounddevice loads only when recording
from .options import add_context_option, add_model_option, add_speech_search_option
from .prompt import Turn, task_instruction
from .session import ChatSession, ContextOverflowError
from .voice.barge_in import BargeInWatch
from .voice.listen import TurnListener
from .voice.speaker import SpokenReply, speak_text, spoken_prefix
from .voice.tts import AUTO, ENGINES, VoiceOptions, try_load_voice

USER_PROMPT = "you> "
BOT_PROMPT = "bot> "
CHAT_HELP = """\
Type a message and press Enter. Commands:
  (empty line)            record from the microphone; Enter again stops and sends it
  /listen                 hands-free: each spoken turn is sent when you pause (Ctrl-C: back to typing)
  /audio FILE [INSTR]     send an audio file, with an optional instruction
  /task NAME [TARGET]     instruction preset for spoken turns: {tasks} (TARGET: Translate's language)
  /undo                   remove the last exchange
  /regenerate             answer the last turn again
  /reset                  start a new conversation
  /help                   this text
  /quit                   leave (or Ctrl-D); Ctrl-C stops a reply in progress"""
NO_VOICE = "none"  # serve --voice none: text only
API_KEY_ENV_VAR = "BLSP_CHAT_API_KEY"  # the serve command's key, kept out of the process list
# The modules whose absence means a command's extra is not installed.
COMMAND_EXTRAS = {"app": ("gradio",), "serve": ("fastapi", "uvicorn")}
COMMAND_HELP = {"app": "the voice chat page in a browser (what `python app.py` serves)",
                "serve": "an OpenAI-compatible HTTP API (chat completions with audio, transcriptions)"}
UNTRAINED_WARNING = ("warning: this model's adapter is untrained (assets/default_adapter is missing), "
                     "so it cannot understand speech; typed turns work.")


# --- arguments -------------------------------------------------------------------------------------
def add_model_options(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_speech_search_option(parser)


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    defaults = GenerationOptions()
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top-p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    fallback = FALLBACK_TEMPERATURES[1:] if getattr(args, "fallback", False) else ()
    return GenerationOptions(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                             top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             fallback_temperatures=fallback)


def build_parser(prog: str = "blsp-chat") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="BLSP speech LLM")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_with_extra(commands, "app", add_app_command)

    chat = commands.add_parser("chat",
                               help="a conversation in the terminal: type, record from the microphone, or send files")
    add_model_options(chat)
    add_context_option(chat)
    chat.add_argument("--instruction", default=None,
                      help="instruction placed before each spoken turn (default: the /task preset, 'Chat': none)")
    chat.add_argument("--mic-device", default=None,
                      help="sounddevice input device (name or index; default: the system's)")
    chat.add_argument("--speak", action="store_true", help="speak each reply aloud, sentence by sentence as it streams")
    chat.add_argument("--hands-free", action="store_true",
                      help="start listening at once: each spoken turn is sent when you pause (the VAD ends it)")
    chat.add_argument("--barge-in", action="store_true",
                      help="hands-free: speaking over a reply stops it and starts your next turn (use headphones)")
    add_voice_option(chat)
    add_generation_options(chat)

    gen = commands.add_parser("generate", help="reply to one spoken or typed turn, or to every line of a manifest")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--audio", help="audio file to speak to the model (wav, flac, mp3, ogg, ...)")
    source.add_argument("--text", help="a typed turn instead of speech")
    source.add_argument("--manifest", help='JSON lines, one {"audio": FILE, "instruction"?: ...} per line; needs --out')
    gen.add_argument("--out", help="with --manifest: JSON lines output, appended to and resumed from")
    gen.add_argument("--batch-size", type=int, default=8, help="with --manifest: lines generated together")
    gen.add_argument("--instruction", default="",
                     help="text placed before the speech, e.g. 'Please repeat the following words.' "
                          "(a manifest line's own \"instruction\" wins)")
    add_model_options(gen)
    add_generation_options(gen)
    gen.add_argument("--speech-out", metavar="WAV", help="also write the reply, spoken, to this wav file")
    add_voice_option(gen)
    gen.add_argument("--fallback", action="store_true",
                     help="decode a looping reply again at rising temperature (0.2 ... 1.0), as openai/whisper does; "
                          "the small default model loops on some clips when asked to repeat them")
    add_with_extra(commands, "serve", add_serve_command)
    commands.add_parser("download", help="fetch and convert the offline default base models into the cache")
    return parser


def add_voice_option(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--voice", choices=(AUTO, *ENGINES), default=AUTO,
                        help="the spoken replies' voice (auto: piper's natural voice, else espeak-ng)")


def missing_modules(command: str) -> list[str]:
    """The modules of `command`'s extra that are not installed."""
    return [name for name in COMMAND_EXTRAS[command] if importlib.util.find_spec(name) is None]


def add_with_extra(commands, command: str, add) -> None:
    """`add(commands)` where the command's extra is installed; otherwise a stand-in without options (their
    defaults may come from the very modules that are missing) that says what to install."""
    missing = missing_modules(command)
    if not missing:
        add(commands)
        return
    stand_in = commands.add_parser(command, help=f"{COMMAND_HELP[command]} (needs: pip install 'blsp-chat[{command}]')",
                                   add_help=False)
    stand_in.set_defaults(missing_extra=missing)


def add_app_command(commands) -> None:
    from .app import DESCRIPTION, add_app_arguments

    app = commands.add_parser("app", help=COMMAND_HELP["app"], description=DESCRIPTION)
    add_app_arguments(app)


def add_serve_command(commands) -> None:
    from . import serve as server  # fastapi: the serve command's defaults come from it

    serve = commands.add_parser("serve", help=COMMAND_HELP["serve"])
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV_VAR),
                       help=f"require 'Authorization: Bearer KEY' on every request (or ${API_KEY_ENV_VAR})")
    serve.add_argument("--served-model-name", default=server.DEFAULT_MODEL_ID, help="the model id requests name")
    serve.add_argument("--max-audio-seconds", type=float, default=DEFAULT_MAX_AUDIO_SECONDS,
                       help="longest clip accepted")
    serve.add_argument("--max-tokens-limit", type=int, default=server.DEFAULT_MAX_TOKENS_LIMIT,
                       help="most max_tokens a request may ask for")
    serve.add_argument("--max-body-mb", type=float, default=server.DEFAULT_MAX_BODY_BYTES / server.MEBIBYTE,
                       help="largest request body")
    add_context_option(serve)
    serve.add_argument("--voice", choices=(AUTO, *ENGINES, NO_VOICE), default=AUTO,
                       help="the voice of spoken replies and /v1/audio/speech (auto: piper's natural voice, else "
                            "espeak-ng, else text only; none: text only)")


# --- generate --------------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> int:
    if args.manifest:
        return run_manifest(args)
    if args.out:
        print("error: --out goes with --manifest", file=sys.stderr)
        return 2

    options = generation_options(args)
    try:
        audio = load_audio(args.audio) if args.audio else None
    except AudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loaded = weights.load_pretrained(args.model, revision=args.revision, device=args.device,
                                     speech_search=args.speech_search)
    if audio is not None and not loaded.adapter_trained:
        print(UNTRAINED_WARNING, file=sys.stderr)
    if audio is None:
        turn, audios = Turn("human", instruction=args.instruction, text=args.text), []
    else:
        turn, audios = speech_turn(audio, loaded.model, instruction=args.instruction), [audio]
    try:
        reply = generate_reply(loaded, [turn], audios, options)
    except AudioError as err:  # the model heard no words in the clip
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(reply)
    return write_spoken_reply(reply, args.speech_out, args.voice) if args.speech_out else 0


def write_spoken_reply(reply: str, path: str, engine: str) -> int:
    """--speech-out: the reply spoken into a wav file; without a voice, a notice (the text was printed)."""
    voice, notice = try_load_voice(VoiceOptions(engine=engine))
    if voice is None:
        print(f"error: {notice}; {path} was not written", file=sys.stderr)
        return 1
    audio = speak_text(voice, reply)
    if not len(audio):
        print(f"error: the reply has nothing to say aloud; {path} was not written", file=sys.stderr)
        return 1
    sf.write(path, audio, voice.sample_rate, subtype="PCM_16")
    print(f"(spoken by {voice.description}: {len(audio) / voice.sample_rate:.1f} s -> {path})", file=sys.stderr)
    return 0


def run_manifest(args: argparse.Namespace) -> int:
    if not args.out:
        print("error: --manifest needs --out OUT.jsonl", file=sys.stderr)
        return 2
    if args.speech_out:
        print("error: --speech-out goes with --audio or --text, not --manifest", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    options = generation_options(args)
    try:
        manifest.read_manifest(args.manifest)
        manifest.done_lines(Path(args.out))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loaded = weights.load_pretrained(args.model, revision=args.revision, device=args.device,
                                     speech_search=args.speech_search)
    if not loaded.adapter_trained:
        print(UNTRAINED_WARNING, file=sys.stderr)
    summary = manifest.run_manifest(loaded, args.manifest, args.out, batch_size=args.batch_size,
                                    instruction=args.instruction, options=options)
    print(f"{summary.answered} answered, {summary.failed} failed, {summary.skipped} already done "
          f"(of {summary.total} lines) -> {args.out}", file=sys.stderr)
    return 0


# --- chat ------------------------------------------------------------------------------------------
def say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


class TerminalChat:
    """The read-eval-print loop of `chat` over one ChatSession. `read_line` is `input` in a terminal."""

    def __init__(self, loaded: weights.LoadedBlsp, options: GenerationOptions, instruction: str | None = None,
                 mic_device=None, read_line: Callable[[str], str] = input, max_context_tokens: int | None = None,
                 voice=None, player=None, hands_free: bool = False, barge_in: bool = False):
        self.loaded = loaded
        self.session = ChatSession.from_loaded(loaded, max_context_tokens=max_context_tokens)
        self.options = options
        self.task = "Chat"
        self.instruction = instruction if instruction is not None else TASK_PRESETS[self.task]
        self.mic_device = mic_device
        self.read_line = read_line
        self.mic_problem: str | None = None
        self.voice, self.player = voice, player  # spoken replies when both are given (--speak)
        self.hands_free = hands_free
        self.barge_in = barge_in            # hands-free: speech over a reply stops it (headphones)
        self._spoken = None                 # the reply being spoken, for barge-in to stop
        self._barged = threading.Event()    # set by barge-in (the listener's thread) until the next reply
        self.commands = {"/audio": self.send_file, "/listen": self.listen, "/task": self.set_task, "/undo": self.undo,
                         "/regenerate": self.regenerate, "/reset": self.reset, "/help": self.help}

    # --- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        say(f"BLSP chat with {self.loaded.source}. /help lists the commands; /quit or Ctrl-D leaves.")
        if not self.loaded.adapter_trained:
            say(UNTRAINED_WARNING)
        self.mic_problem = microphone_problem(self.mic_device)
        if self.mic_problem:
            say(f"No microphone: {self.mic_problem}. Typed messages and /audio FILE still work.")
        else:
            say("Press Enter on an empty line to speak, or /listen to talk hands-free.")
        if self.hands_free and not self.mic_problem:
            self.handle("/listen")  # as if typed: a microphone that fails to start is reported, not fatal
        while True:
            try:
                line = self.read_line(USER_PROMPT)
            except EOFError:
                say()
                return 0
            except KeyboardInterrupt:
                say("\n(/quit or Ctrl-D leaves)")
                continue
            if line.strip().lower() in ("/quit", "/exit"):
                return 0
            self.handle(line)

    def handle(self, line: str) -> None:
        """One line of input; every failure is reported and the chat goes on."""

        try:
            stripped = line.strip()
            if not stripped:
                self.record()
            elif stripped.startswith("/"):
                name, _, rest = stripped.partition(" ")
                command = self.commands.get(name.lower())
                if command is None:
                    say(f"Unknown command {name}. /help lists the commands.")
                else:
                    command(rest.strip())
            else:
                self.session.submit_text(stripped)
                self.reply()
        except KeyboardInterrupt:
            self.recover()
            say("\n(interrupted)")
        except (AudioError, ContextOverflowError, MicrophoneUnavailable) as err:
            say(f"error: {err}")
        except (ValueError, OSError) as err:  # a command the session refuses, an unreadable file
            self.recover()
            say(f"error: {err}")
        except Exception as err:  # a failed generation (out of memory, a broken model): keep chatting
            self.recover()
            say(f"error: the reply failed: {err}")

    # --- replies ---------------------------------------------------------------------------------
    def reply(self, chunks: Iterator | None = None) -> None:
        """Stream the reply to the last human turn; Ctrl-C stops it and keeps what was said."""
        chunks = chunks if chunks is not None else self.session.stream_reply(self.options)
        say(BOT_PROMPT, end="")
        last, spoken = None, self.start_speaking()
        self._spoken = spoken
        try:
            for last in chunks:
                if self._barged.is_set():  # barge-in came before the reply had started: cancel it now
                    self.session.cancel()
                    break
                say(last.delta, end="")
                if spoken:
                    spoken.feed(last.delta)
        except KeyboardInterrupt:
            self.session.cancel()
            if spoken:
                spoken.stop()
            say(" [stopped]")
            return
        except BaseException:
            if spoken:
                spoken.stop()
            say()
            raise
        say()
        if spoken:
            self.finish_speaking(spoken)
            if self._barged.is_set():
                self.keep_what_was_spoken(spoken)
        if last is None:
            return
        if not last.text:
            say("(empty reply)")
        if last.stopped_by == "max_new_tokens":
            say(f"(reply cut at {self.options.max_new_tokens} tokens: raise --max-new-tokens for longer ones)")
        if last.stopped_by == "loop":
            say("(reply stopped: it kept saying the same thing over and over)")
        if last.dropped_turns:
            say(f"(the conversation outgrew the model's context: the oldest {last.dropped_turns} turns "
                "are no longer seen by the model)")

    def start_speaking(self):

        return SpokenReply(self.voice, self.player.play, self.player.stop) if self.voice and self.player else None

    def keep_what_was_spoken(self, spoken) -> None:
        """Barge-in cut the spoken reply: the model remembers it only as far as the user heard it."""
        turns = self.session.turns
        if turns and turns[-1].role == "assistant":
            self.session.trim_last_reply(spoken_prefix(turns[-1].text, list(spoken.spoken)))

    def finish_speaking(self, spoken) -> None:
        """Wait for the reply's last sentence to play; Ctrl-C cuts it short."""
        spoken.finish()
        try:
            while not spoken.wait(timeout=0.1):
                pass
        except KeyboardInterrupt:
            spoken.stop()
            say("(stopped speaking)")
        if spoken.error is not None:
            say(f"(the voice failed: {spoken.error}; replies are text only from now on)")
            self.voice = None

    def recover(self) -> None:
        """After an interruption or failure: no reply running, no human turn left without a reply."""
        self.session.cancel()
        turns = self.session.turns
        if turns and turns[-1].role == "human":
            self.session.undo()

    # --- spoken turns ----------------------------------------------------------------------------
    def send_audio(self, audio, instruction: str | None = None) -> None:
        instruction = self.instruction if instruction is None else instruction
        self.session.submit_audio(audio, instruction=instruction)
        said = f"; instruction: {instruction})" if instruction else ")"
        say(f"(sent {len(audio) / SAMPLE_RATE:.1f} s of speech" + said)
        self.reply()

    def send_file(self, rest: str) -> None:
        try:
            words = shlex.split(rest)
        except ValueError:
            words = rest.split()
        if not words:
            say("usage: /audio FILE [instruction]")
            return
        audio = load_audio(words[0])
        self.send_audio(audio, " ".join(words[1:]) or None)

    def record(self) -> None:
        if self.mic_problem:
            say(f"No microphone to record from: {self.mic_problem}. Type a message or use /audio FILE.")
            return

        recorder = Recorder(self.mic_device)
        try:
            recorder.start()
        except Exception as err:  # sounddevice.PortAudioError: device busy, unplugged, unsupported format
            raise MicrophoneUnavailable(f"could not start recording from {recorder.device_name}: {err}") from err
        try:
            say(f"Recording from {recorder.device_name}... press Enter to stop and send (Ctrl-C discards).")
            self.read_line("")
        except (KeyboardInterrupt, EOFError):
            recorder.cancel()
            say("(recording discarded)")
            return
        except BaseException:
            recorder.cancel()
            raise
        if recorder.overflows:
            say(f"(note: the input overflowed {recorder.overflows} times; some audio was lost)")
        self.send_audio(recorder.stop())

    def listen(self, _: str) -> None:
        """Hands-free: every turn the VAD ends is sent, until Ctrl-C (or /listen's caller) stops it."""
        if self.mic_problem:
            say(f"No microphone to listen with: {self.mic_problem}. Type a message or use /audio FILE.")
            return

        recorder = Recorder(self.mic_device, max_seconds=None)
        listener = TurnListener(recorder.read_block, recorder.sample_rate)
        try:
            recorder.start()
        except Exception as err:  # sounddevice.PortAudioError: device busy, unplugged, unsupported format
            raise MicrophoneUnavailable(f"could not start listening on {recorder.device_name}: {err}") from err
        say(f"Listening hands-free on {recorder.device_name}: speak, and pause to send. Ctrl-C returns to typing.")
        try:
            audio = None
            while True:
                audio = audio if audio is not None else listener.next_turn(
                    on_speech_start=lambda: say("(hearing you...)"))
                if audio is None:
                    return
                audio = self.answer_turn(audio, listener)
                if not self.barge_in:
                    recorder.drain()   # what the microphone heard while the reply played is not a turn
                    listener.forget()
        except KeyboardInterrupt:
            say("\n(hands-free off: type, press Enter to record, or /listen again)")
        finally:
            recorder.cancel()

    def answer_turn(self, audio, listener):
        """Send one hands-free turn. With barge-in, listen while the reply runs: speech stops it, and the
        turn that speech makes is returned to be sent next."""
        if not self.barge_in:
            self.handle_turn(audio)
            return None

        self._barged.clear()
        watch = BargeInWatch(listener, interrupt=self.interrupt_reply)
        watch.start()
        try:
            self.handle_turn(audio)
        finally:
            heard = watch.finish()
        return heard

    def interrupt_reply(self) -> None:
        """Barge-in, on the listener's thread: stop the voice at once, then the generation."""
        self._barged.set()
        if self._spoken is not None:
            self._spoken.stop()
        self.session.cancel()
        say(" [interrupted] (hearing you...)")

    def handle_turn(self, audio) -> None:
        """One hands-free turn; a failure is reported and listening goes on."""

        try:
            self.send_audio(audio)
        except (AudioError, ContextOverflowError) as err:
            self.recover()
            say(f"error: {err}")

    # --- commands --------------------------------------------------------------------------------
    def set_task(self, rest: str) -> None:
        name, _, target = rest.partition(" ")
        match = next((t for t in TASK_PRESETS if t.lower() == name.lower()), None) if name else None
        if match is None:
            say(f"Tasks: {', '.join(TASK_PRESETS)} (current: {self.task}). Usage: /task NAME [target language]")
            return
        self.task = match
        self.instruction = task_instruction(match, target.strip() or DEFAULT_TRANSLATION_TARGET)
        given = f"the instruction {self.instruction!r})" if self.instruction else "no instruction)"
        say(f"(task {match}: spoken turns now get " + given)

    def undo(self, _: str) -> None:
        removed = self.session.undo()
        say("(removed the last exchange)" if removed else "(nothing to undo)")

    def regenerate(self, _: str) -> None:
        self.reply(self.session.regenerate(self.options))

    def reset(self, _: str) -> None:
        self.session.clear()
        say("(new conversation)")

    def help(self, _: str) -> None:
        say(CHAT_HELP.format(tasks=", ".join(TASK_PRESETS)))


def run_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    # Ctrl-C stops a reply. A shell starts background jobs (nohup, `&`) with SIGINT ignored, and Python
    # then never raises KeyboardInterrupt: take the signal back for this interactive program.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    options = generation_options(args)
    loaded = weights.load_pretrained(args.model, revision=args.revision, device=args.device,
                                     speech_search=args.speech_search)
    device = int(args.mic_device) if args.mic_device and args.mic_device.isdigit() else args.mic_device
    voice, player = chat_voice(args.voice) if args.speak else (None, None)
    return TerminalChat(loaded, options, args.instruction, device, max_context_tokens=args.max_context_tokens,
                        voice=voice, player=player, hands_free=args.hands_free, barge_in=args.barge_in).run()


def chat_voice(engine: str):
    """(voice, player) for --speak, or (None, None) with a notice: the chat then answers in text only."""

    try:
        player = Player()
    except (MicrophoneUnavailable, OSError) as err:
        say(f"(no sound output: {err}; replies are text only)")
        return None, None
    voice, notice = try_load_voice(VoiceOptions(engine=engine))
    if voice is None:
        say(f"({notice})")
        return None, None
    say(f"(replies are spoken by {voice.description})")
    return voice, player


def run_app(args: argparse.Namespace) -> int:
    from . import app

    app.run(args)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from . import serve as server

    limits = server.ServerLimits(max_body_bytes=int(args.max_body_mb * server.MEBIBYTE),
                                 max_audio_seconds=args.max_audio_seconds, max_tokens=args.max_tokens_limit)
    loaded = weights.load_pretrained(args.model, revision=args.revision, device=args.device,
                                     speech_search=args.speech_search)
    if not loaded.adapter_trained:
        print(UNTRAINED_WARNING, file=sys.stderr)
    engine = server.InProcessEngine(loaded, model_id=args.served_model_name, max_context_tokens=args.max_context_tokens)
    voice = None if args.voice == NO_VOICE else VoiceOptions(engine=args.voice)
    server.serve(engine, host=args.host, port=args.port, api_key=args.api_key or None, limits=limits, voice=voice)
    return 0


def run_download(_: argparse.Namespace) -> int:
    for name, path in offline.download_defaults().items():
        print(f"{name}: {path}")
    return 0


def main(argv: list[str] | None = None, prog: str = "blsp-chat") -> int:
    """The `blsp-chat` command (pyproject.toml's console script); `python -m blsp_chat` names itself as such."""
    parser = build_parser(prog)
    args, unknown = parser.parse_known_args(argv)  # a stand-in command's options are all unknown to it
    if missing := getattr(args, "missing_extra", None):
        print(f"error: `{prog} {args.command}` needs the {args.command} extra ({', '.join(missing)} not installed): "
              f"pip install 'blsp-chat[{args.command}]'", file=sys.stderr)
        return 2
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    handlers = {"app": run_app, "chat": run_chat, "generate": run_generate, "serve": run_serve,
                "download": run_download}
    try:
        return handlers[args.command](args)
    except offline.WeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # invalid generation options
        print(f"error: {err}", file=sys.stderr)
        return 2
