"""A process that exits while a ChatSession reply still runs exits cleanly: the reply is cancelled at exit and its
thread finishes its step first. Before, a script that left a stream early and exited could abort with
"terminate called without an active exception" (Python ended the daemon reply thread inside a torch op)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# The reply's decode steps are slow torch work, and the script exits while one is under way.
SCRIPT = """
import sys, threading, torch
from blsp_chat.config import GenerationOptions
from blsp_chat.session import ChatSession
from tiny import lively_blsp, tiny_tokenizer

real_step, in_step, work = ChatSession._decode_step, threading.Event(), torch.randn(1000, 1000)

def slow_step(self, decode_step, token):
    in_step.set()
    for _ in range(3):
        work @ work
    return real_step(self, decode_step, token)

ChatSession._decode_step = slow_step
session = ChatSession(lively_blsp(seed=3), tiny_tokenizer())
session.submit_text("Hello there")
chunks = session.stream_reply(GenerationOptions(max_new_tokens=64))
if sys.argv[1] == "left-early":
    for chunk in chunks:
        break
in_step.wait(60)
print("exiting during a step", flush=True)
"""


@pytest.mark.parametrize("how", ["left-early", "never-read"])
def test_exiting_during_a_reply_exits_cleanly(how):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}
    result = subprocess.run([sys.executable, "-c", SCRIPT, how], capture_output=True, text=True, timeout=300, env=env)
    assert "exiting during a step" in result.stdout, result.stderr[-2000:]
    assert "terminate called" not in result.stderr
    assert result.returncode == 0, result.stderr[-2000:]
