"""app.py options: safe defaults locally, the platform's host and port on Spaces."""
import pytest

import app


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
