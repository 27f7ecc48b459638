"""The app's options (`python app.py`, `blsp-chat app`): safe defaults locally, the platform's host and port on
Spaces."""
import pytest

import blsp_chat.weights
from blsp_chat import app
from blsp_chat.cli import build_parser


def test_local_default_binds_loopback_without_sharing(monkeypatch):
    for name in ("SPACE_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT", "BLSP_CHAT_AUTH"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)


def test_spaces_binds_all_interfaces_on_the_platform_port(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/blsp-chat")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    args = app.parse_args([])
    assert (args.host, args.port) == ("0.0.0.0", 7861)


def test_auth_from_flag_or_environment(monkeypatch):
    monkeypatch.setenv("BLSP_CHAT_AUTH", "ana:secret")
    assert app.parse_auth(app.parse_args([]).auth) == ("ana", "secret")
    assert app.parse_auth(app.parse_args(["--auth", "bo:pw:with:colons"]).auth) == ("bo", "pw:with:colons")
    with pytest.raises(SystemExit, match="USER:PASS"):
        app.parse_auth("no-colon")


def test_max_context_tokens_is_one_option_for_every_entry_point(capsys):
    assert app.parse_args(["--max-context-tokens", "300"]).max_context_tokens == 300
    assert app.parse_args([]).max_context_tokens is None  # the LLM's own context
    for command in ("chat", "serve"):
        assert build_parser().parse_args([command, "--max-context-tokens", "300"]).max_context_tokens == 300
    for bad in ("0", "-5", "many"):
        with pytest.raises(SystemExit):
            app.parse_args(["--max-context-tokens", bad])
    assert "max-context-tokens" in capsys.readouterr().err


def test_speech_search_is_one_option_for_every_entry_point(capsys):
    assert app.parse_args([]).speech_search is None  # the checkpoint's own
    assert app.parse_args(["--speech-search", "greedy"]).speech_search == "greedy"
    for command in (["chat"], ["serve"], ["generate", "--text", "hi"]):
        assert build_parser().parse_args([*command, "--speech-search", "fused"]).speech_search == "fused"
    with pytest.raises(SystemExit):
        app.parse_args(["--speech-search", "beam"])
    assert "speech-search" in capsys.readouterr().err


def test_cache_ceiling_has_a_default_and_refuses_nonsense():
    assert app.parse_args([]).max_cached_tokens == app.DEFAULT_MAX_CACHED_TOKENS
    assert app.parse_args(["--max-cached-tokens", "5000"]).max_cached_tokens == 5000
    with pytest.raises(SystemExit):
        app.parse_args(["--max-cached-tokens", "0"])


def test_a_malformed_auth_is_reported_before_the_model_loads(monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --auth was checked")

    monkeypatch.setattr(blsp_chat.weights, "load_pretrained", must_not_load)
    with pytest.raises(SystemExit, match="USER:PASS"):
        app.main(["--auth", "no-colon"])


def test_blsp_chat_app_takes_the_options_of_app_py(monkeypatch):
    for name in ("SPACE_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "PORT", "BLSP_CHAT_AUTH", "BLSP_CHAT_MODEL",
                 "BLSP_CHAT_REVISION"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--port", "7000", "--max-cached-tokens", "900", "--speech-search", "greedy", "--auth", "a:b"]
    from_cli = vars(build_parser().parse_args(["app", *argv]))
    assert from_cli.pop("command") == "app"
    assert from_cli == vars(app.parse_args(argv))


def test_blsp_chat_app_checks_auth_before_the_model_loads(monkeypatch):
    from blsp_chat import cli

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --auth was checked")

    monkeypatch.setattr(blsp_chat.weights, "load_pretrained", must_not_load)
    with pytest.raises(SystemExit, match="USER:PASS"):
        cli.main(["app", "--auth", "no-colon"])


def test_the_app_and_every_command_read_the_model_and_revision_from_the_environment(monkeypatch):
    monkeypatch.setenv("BLSP_CHAT_MODEL", "org/blsp")
    monkeypatch.setenv("BLSP_CHAT_REVISION", "v2")
    commands = [["app"], ["chat"], ["generate", "--text", "hi"], ["serve"]]
    for parsed in [app.parse_args([]), *(build_parser().parse_args(command) for command in commands)]:
        assert (parsed.model, parsed.revision) == ("org/blsp", "v2")
    assert build_parser().parse_args(["chat", "--model", "here", "--revision", "main"]).model == "here"
