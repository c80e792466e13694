"""Helpers for the serve tests: a GLM-format test checkpoint, servers, a scripted engine.

The checkpoint is a random tiny glm4_moe model with the demo's tokenizer and a chat template in
GLM-4.5's format (tools in a system block, <tool_call>/<arg_key>/<arg_value>, <think>,
<|observation|> tool results), written here: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

from runtime.weights.tiny import write_tiny

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"

GLM45_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
...
</tool_call>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|system|>
{{ m.content }}
{%- elif m.role == 'user' -%}
<|user|>
{{ m.content }}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- if m.reasoning_content -%}
<think>{{ m.reasoning_content }}</think>
{%- else -%}
<think></think>
{%- endif -%}
{%- if m.content %}

{{ m.content.strip() }}
{%- endif -%}
{%- if m.tool_calls -%}
{%- for tc in m.tool_calls -%}
{%- set f = tc.function if tc.function else tc %}

<tool_call>{{ f.name }}
{% for k, v in f.arguments.items() -%}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v if v is string else v | tojson(ensure_ascii=False) }}</arg_value>
{% endfor -%}
</tool_call>
{%- endfor -%}
{%- endif -%}
{%- elif m.role == 'tool' -%}
<|observation|>
<tool_response>
{{ m.content }}
</tool_response>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{%- endif -%}"""


def write_glm_checkpoint(out: Path, mtp: int = 0) -> Path:
    """Tiny random glm4_moe weights (``mtp`` MTP layers) + the demo tokenizer + the
    GLM-4.5-format template."""
    write_tiny(out, "glm4_moe", vocab_size=4096, mtp=mtp)
    shutil.copy(DEMO / "tokenizer.json", out / "tokenizer.json")
    cfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    cfg["chat_template"] = GLM45_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UvicornThread:
    """A real uvicorn server on 127.0.0.1:<ephemeral port> in a thread; stops on exit."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start in 30 s"
            assert self.thread.is_alive(), "uvicorn exited"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


class ScriptedEngine:
    """TEST DOUBLE (tests only): a real Engine whose emitted *text* for scripted requests is
    replaced by a fixed reply, cut into small deltas so tags split across events. Generation,
    pages, usage and verdicts are the real engine's; only the text is scripted, because a random
    model never writes a tool call by itself. It also records each prompt the server sent."""

    def __init__(self, engine, script: str, chunk: int = 3, when=lambda prompt: True):
        self._engine, self.script, self.chunk, self.when = engine, script, chunk, when
        self.prompts: dict[str, str] = {}
        self._sent: dict[str, int] = {}

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, prompt=None, **kw):
        rid = self._engine.submit(prompt, **kw)
        self.prompts[rid] = prompt
        if self.when(prompt):
            self._sent[rid] = 0
        return rid

    def step(self):
        out = []
        for ev in self._engine.step():
            n = self._sent.get(ev.request_id)
            if n is not None:
                end = len(self.script) if ev.finished else n + self.chunk
                ev = replace(ev, text=self.script[n:end])
                self._sent[ev.request_id] = min(end, len(self.script))
            out.append(ev)
        return out


class SlowEngine:
    """TEST DOUBLE (tests only): a real Engine whose steps take at least `delay_s`, so a
    request stays in flight long enough to test overload and disconnects."""

    def __init__(self, engine, delay_s: float = 0.03):
        self._engine, self.delay_s = engine, delay_s

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self):
        time.sleep(self.delay_s)
        return self._engine.step()


def quiescent_pages(engine) -> None:
    """After every request ended: each L1 page FREE or CACHED, refcount == owners == 0."""
    for rec in engine.kv.alloc.records:
        assert rec.state.value in ("FREE", "CACHED"), rec
        assert rec.refcount == len(rec.owners) == 0 and not rec.writers, rec
    engine.kv.sched.check_invariants()


# GLM-4.7 / GLM-5 style: compact tool calls (no newlines) and a generation prompt that opens
# the think block (`<|assistant|><think>`), so the reply starts inside the reasoning.
GLM5_TEMPLATE = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>\
...</tool_call>
{%- endif -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|system|>{{ m.content }}
{%- elif m.role == 'user' -%}
<|user|>{{ m.content }}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- if m.reasoning_content -%}
<think>{{ m.reasoning_content }}</think>
{%- else -%}
<think></think>
{%- endif -%}
{%- if m.content -%}
{{ m.content.strip() }}
{%- endif -%}
{%- if m.tool_calls -%}
{%- for tc in m.tool_calls -%}
{%- set f = tc.function if tc.function else tc -%}
{{- '<tool_call>' ~ f.name -}}
{%- for k, v in f.arguments.items() -%}
<arg_key>{{ k }}</arg_key><arg_value>{{ v if v is string else v | tojson(ensure_ascii=False) }}\
</arg_value>
{%- endfor -%}
</tool_call>
{%- endfor -%}
{%- endif -%}
{%- elif m.role == 'tool' -%}
<|observation|><tool_response>{{ m.content }}</tool_response>
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|><think>
{%- endif -%}"""


def write_glm5_style_checkpoint(out: Path) -> Path:
    """Like write_glm_checkpoint, with the GLM-4.7/GLM-5 style template."""
    write_glm_checkpoint(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = GLM5_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out
