"""Input fuzzing (hypothesis, bounded example counts: docs/robustness.md).

Contract for every case: the run ends with exit status 0 and one output record per input line
(batch lines: a result or ``{"id", "error"}`` naming the file and line), or exit status 2 with
ONE line on stderr naming the file (and the field / tensor); never a traceback, never a hang
(each example runs under a deadline).
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import struct
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.batch import run_batch
from app.cli import main
from runtime.engine import Engine, EngineConfig
from runtime.errors import KvscopeError

DEMO = Path(__file__).resolve().parents[2] / "assets" / "demo"
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run (CI stays reproducible)
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

EXAMPLE_DEADLINE_S = 120  # an example running longer is a hang: the test fails


@contextmanager
def no_hang(seconds: int = EXAMPLE_DEADLINE_S):
    """Fail (instead of hanging the suite) when the body runs over ``seconds``."""

    def fire(signum, frame):
        raise TimeoutError(f"example ran over {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ---- batch JSONL lines -------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
prompt_ids = st.lists(st.integers(min_value=-5, max_value=2**40), min_size=0, max_size=8) | st.just(
    [3] * 600  # longer than the tiny model's context (512)
)
fields = {
    "id": st.text(max_size=8) | st.integers(-3, 3) | values,
    "prompt": st.text(max_size=20) | values,
    "prompt_ids": prompt_ids | values,
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.text(max_size=6), "content": st.text(max_size=8)}),
        max_size=2,
    )
    | values,
    "max_new_tokens": st.integers(-2, 4) | st.just(10**30) | values,
    "temperature": st.floats(-1, 3) | values,
    "top_p": st.floats(-0.5, 1.5) | values,
    "top_k": st.integers(-2, 10**20) | values,
    "seed": st.integers(-(2**70), 2**70) | values,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=3), max_size=2) | values,
    "extra": values,
}
request = st.fixed_dictionaries({}, optional=fields)
line = (
    request.map(lambda r: json.dumps(r, ensure_ascii=False))
    | st.text(max_size=30)  # not JSON, or JSON that is not an object
    | values.map(json.dumps)
    | st.binary(max_size=20).map(lambda b: b.decode("latin-1"))
)


@pytest.fixture(scope="module")
def engine(tiny_dsa):
    e = Engine(tiny_dsa, EngineConfig(device="cpu", page_size=4, max_running=4))
    yield e
    e.close()


@settings(FUZZ, max_examples=60)
@given(lines=st.lists(line, min_size=1, max_size=4))
def test_batch_lines(engine, tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("jsonl")
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    text = "\n".join(x.replace("\n", " ").replace("\r", " ") for x in lines) + "\n"
    inp.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    defaults = {"max_new_tokens": 2, "temperature": 0.0, "seed": None}
    with no_hang():
        run_batch(engine, inp, out, defaults)
    n_lines = sum(1 for x in inp.read_bytes().splitlines() if x.strip())
    recs = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(recs) == n_lines
    for rec in recs:
        assert "id" in rec
        if "error" in rec:
            assert str(inp) in rec["error"] and "\n" not in rec["error"]
        else:
            assert rec["finish_reason"] in ("length", "stop") and rec["token_ids"]
    assert not engine.has_work()


# ---- model directories -------------------------------------------------------------------------
def _cli_batch(model: Path, tmp: Path) -> tuple[int, str]:
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt_ids": [3, 4], "max_new_tokens": 2}) + "\n")
    err = io.StringIO()
    with redirect_stderr(err), no_hang():
        code = main(
            ["batch", "--model", str(model), "--input", str(inp), "--output", str(out)]
            + ["--device", "cpu", "--quiet", "--page-size", "4"]
        )
    return code, err.getvalue()


def _one_line_error(code: int, err: str, names: str) -> None:
    assert "Traceback" not in err
    if code == 0:
        return
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvscope: error: "), err
    assert names in lines[0], err


CONFIG_KEYS = [
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "max_position_embeddings",
    "head_dim",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "index_topk",
    "index_n_heads",
    "index_head_dim",
    "n_group",
    "topk_group",
    "rope_theta",
    "rms_norm_eps",
    "eos_token_id",
]
config_value = (
    st.integers(-3, 5)
    | st.integers(2**31, 2**63)
    | st.sampled_from(["glm_moe_dsa", "glm4_moe", "llama", ""])
    | st.floats(allow_nan=True)
    | st.none()
    | st.lists(st.integers(-1, 3), max_size=3)
    | st.text(max_size=4)
)
config_edit = st.lists(
    st.tuples(st.sampled_from(CONFIG_KEYS), st.none() | config_value), min_size=1, max_size=3
)


@pytest.fixture(scope="module")
def model_copy(tiny_dsa, tmp_path_factory):
    """A writable copy of the tiny checkpoint, restored before each example."""
    root = tmp_path_factory.mktemp("fuzzmodel")
    dst = root / "m"

    def fresh() -> Path:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(tiny_dsa, dst)
        return dst

    return fresh


@settings(FUZZ, max_examples=40)
@given(edit=config_edit | st.just("truncate") | st.just("list"))
def test_config_json(model_copy, tmp_path_factory, edit):
    model = model_copy()
    path = model / "config.json"
    if edit == "truncate":
        path.write_text(path.read_text()[:40])
    elif edit == "list":
        path.write_text("[1, 2]")
    else:
        raw = json.loads(path.read_text())
        for key, value in edit:
            if value is None:
                raw.pop(key, None)  # a missing key
            else:
                raw[key] = value
        path.write_text(json.dumps(raw))
    code, err = _cli_batch(model, tmp_path_factory.mktemp("cfg"))
    _one_line_error(code, err, "config.json")


def _rewrite_safetensors(path: Path, edit) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    kind, pick, arg = edit
    names = sorted(k for k in header if k != "__metadata__")
    name = names[pick % len(names)]
    if kind == "truncate":
        path.write_bytes(data[: arg % len(data)])
        return
    if kind == "dtype":
        header[name]["dtype"] = ["F64", "I8", "BOOL", "U8", "F8_E4M3", "XX"][arg % 6]
    elif kind == "shape":
        shape = header[name]["shape"]
        header[name]["shape"] = (shape[:-1] + [shape[-1] + 1]) if arg % 2 else shape[::-1]
        if arg % 3 == 0:
            header[name]["shape"] = [arg]
    elif kind == "missing":
        del header[name]
    elif kind == "extra":
        header[f"model.layers.99.extra_{arg}"] = dict(header[name])
    elif kind == "offsets":
        header[name]["data_offsets"] = [arg, arg + 4]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@settings(FUZZ, max_examples=40)
@given(
    edit=st.tuples(
        st.sampled_from(["truncate", "dtype", "shape", "missing", "extra", "offsets"]),
        st.integers(0, 1000),
        st.integers(0, 10**6),
    )
)
def test_safetensors_header(model_copy, tmp_path_factory, edit):
    model = model_copy()
    _rewrite_safetensors(model / "model.safetensors", edit)
    code, err = _cli_batch(model, tmp_path_factory.mktemp("st"))
    _one_line_error(code, err, "model.safetensors")


@settings(FUZZ, max_examples=25)
@given(
    target=st.sampled_from(["tokenizer.json", "tokenizer_config.json"]),
    cut=st.integers(0, 4000),
    junk=st.sampled_from(["", "{", "[]", "null", '{"chat_template": 5}', '{"eos_token": [1]}']),
)
def test_tokenizer_files(model_copy, tmp_path_factory, target, cut, junk):
    model = model_copy()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, model / name)
    path = model / target
    text = path.read_text(encoding="utf-8")
    path.write_text(junk if junk else text[: cut % max(len(text), 1)], encoding="utf-8")
    inp_dir = tmp_path_factory.mktemp("tok")
    inp, out = inp_dir / "in.jsonl", inp_dir / "out.jsonl"
    inp.write_text(
        json.dumps({"id": "t", "prompt": "hello", "max_new_tokens": 2})
        + "\n"
        + json.dumps({"id": "m", "messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    err = io.StringIO()
    with redirect_stderr(err), no_hang():
        code = main(
            ["batch", "--model", str(model), "--input", str(inp), "--output", str(out)]
            + ["--device", "cpu", "--quiet", "--page-size", "4", "--max-new-tokens", "2"]
        )
    _one_line_error(code, err.getvalue(), target)
    if code == 0:
        recs = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(recs) == 2 and all("error" in r or r["token_ids"] for r in recs)
        for r in recs:
            assert "error" not in r or "\n" not in r["error"]


def test_kvscope_errors_are_one_line():
    assert "\n" not in str(KvscopeError("x"))
