"""Every run ends cleanly (issue 15): exit status 0 with a compile in flight, Ctrl+Q in the TUI,
SIGINT / SIGTERM mid-batch (130 / 143, whole lines, a usable L3), --resume after SIGKILL.

The subprocess tests run the installed `kvscope` console script (the real entry point, with
app/shutdown.finish at the end) on tiny checkpoints; each request is a few tokens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from app.cli import main
from app.jsonl import complete_ids

KVSCOPE = str(Path(sys.executable).with_name("kvscope"))
pytestmark = pytest.mark.skipif(not Path(KVSCOPE).exists(), reason="kvscope script not installed")


RUN = ["--device", "cpu", "--quiet", "--max-running", "1", "--page-size", "4"]


def _env(tmp_path: Path, **extra) -> dict:
    env = dict(os.environ)
    env.update(
        TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),  # nothing compiled yet
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        KVSCOPE_CPU_GRAPH="0",
    )
    env.update(extra)
    return env


def _requests(path: Path, n: int, max_new: int) -> Path:
    # distinct prompts with a shared 4-token prefix (the L3 serves it to the next run)
    lines = [
        json.dumps({"id": f"r{i}", "prompt_ids": [5, 6, 7, 8, 10 + i], "max_new_tokens": max_new})
        for i in range(n)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _records(path: Path) -> dict[str, dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "torn last line"
    recs = [json.loads(line) for line in text.splitlines()]
    by_id = {r["id"]: r for r in recs}
    assert len(by_id) == len(recs), "an id written twice"
    return by_id


def _same(rec: dict) -> dict:
    """A record without its cache-hit counts (an L3 left by an earlier run serves prefixes)."""
    out = json.loads(json.dumps(rec))
    out["usage"].pop("cached_tokens")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dsa):
    """An uninterrupted in-process run of the requests the subprocess tests use."""
    tmp = tmp_path_factory.mktemp("ref")
    inp = _requests(tmp / "in.jsonl", 6, 6)
    out = tmp / "out.jsonl"
    args = ["batch", "--model", str(tiny_dsa), "--input", str(inp), "--output", str(out)]
    assert main([*args, *RUN]) == 0
    return inp, _records(out)


SITE = """
import os, app.shutdown as s
_orig = s.stop_background
def _stop(timeout=s.THREAD_WAIT_S):
    import runtime.models.cpu_graph as cg
    with open(os.environ["KVSCOPE_TEST_MARK"], "w") as f:
        f.write(str(cg.compiles_running()))
    return _orig(timeout)
s.stop_background = _stop
"""


def test_batch_on_a_fresh_checkpoint_exits_0_with_a_compile_in_flight(tmp_path):
    """The exit-134 crash: the CPU decode graph compiles in the background when the batch
    ends. A sitecustomize records that a compile was indeed running at exit."""
    env = _env(tmp_path, KVSCOPE_CPU_GRAPH="1", KVSCOPE_TEST_MARK=str(tmp_path / "mark"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITE))
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    ckpt = tmp_path / "ckpt"
    made = subprocess.run(
        [KVSCOPE, "make-tiny", "--arch", "glm_moe_dsa", "--out", str(ckpt)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0 and made.stderr == "", made.stderr
    inp = _requests(tmp_path / "in.jsonl", 2, 32)  # old code: 2 x 32 crashed 2 runs in 2
    out = tmp_path / "out.jsonl"
    run = subprocess.run(
        [KVSCOPE, "batch", "--model", str(ckpt), "--input", str(inp), "--output", str(out)]
        + ["--device", "cpu", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stderr == ""  # --quiet: no progress, no summary, nothing else
    assert len(_records(out)) == 2
    assert (tmp_path / "mark").read_text() == "True", "no compile was running at exit"


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_mid_batch(tmp_path, tiny_dsa, reference, sig, status):
    inp, want = reference
    out, l3 = tmp_path / "out.jsonl", tmp_path / "l3"
    cmd = [KVSCOPE, "batch", "--model", str(tiny_dsa), "--input", str(inp), "--output", str(out)]
    cmd += [*RUN, "--kv-disk", str(l3)]
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no output line in 300 s"
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == status, err
    assert "Traceback" not in err and "terminate" not in err
    got = _records(out)  # every line whole, each id once
    assert 1 <= len(got) < len(want), "the signal came too late to stop anything"
    for rid, rec in got.items():
        assert _same(rec) == _same(want[rid])
    # the next run, on the same L3 directory, resumes and produces identical tokens
    resumed = subprocess.run(
        [*cmd, "--resume"], env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    final = _records(out)
    assert set(final) == set(want)
    assert all(_same(final[r]) == _same(want[r]) for r in want)
    # the shared first page came back from the first run's L3
    assert any(final[r]["usage"]["cached_tokens"]["L3"] for r in want if r not in got)


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_dsa, reference):
    inp, want = reference
    out = tmp_path / "out.jsonl"
    cmd = [KVSCOPE, "batch", "--model", str(tiny_dsa), "--input", str(inp), "--output", str(out)]
    cmd += RUN
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait(60)
    with out.open("a") as f:  # as if killed in the middle of writing the next line
        f.write('{"id": "r5", "text": "hal')
    first = out.read_text()
    resumed = subprocess.run(
        [*cmd, "--resume"], env=_env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    final = _records(out)
    kept = first[: first.rindex("\n") + 1]
    assert out.read_text().startswith(kept)  # complete lines kept, the torn one rewritten
    assert list(final) != [] and set(final) == set(want)
    assert {r: _same(final[r]) for r in final} == {r: _same(want[r]) for r in want}


def test_complete_ids_cuts_only_a_torn_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"id": "a"}\n\n{"id": 7}\n{"id": "b", "te')
    assert complete_ids(out) == {'"a"', "7"}
    assert out.read_text() == '{"id": "a"}\n\n{"id": 7}\n'
    out.write_text('{"id": "a"}\nnot json\n{"id": 7}\n')
    with pytest.raises(Exception, match="cannot --resume"):
        complete_ids(out)


def test_duplicate_ids_are_error_records(tmp_path, tiny_dsa):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rec = {"id": "x", "prompt_ids": [3, 4], "max_new_tokens": 2}
    inp.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    args = ["batch", "--model", str(tiny_dsa), "--input", str(inp), "--output", str(out)]
    assert main([*args, "--device", "cpu", "--quiet"]) == 0
    recs = _records(out)  # output lines come in finishing order
    assert set(recs) == {"x", "line-2"} and "token_ids" in recs["x"]
    assert 'duplicate id "x" (first on line 1)' in recs["line-2"]["error"]


def test_tui_quits_on_ctrl_q_and_its_threads_end(tiny_dsa):
    """chat and inspect on a real engine (Textual's pilot): Ctrl+Q ends the app and its
    driver thread and, with Engine.close, the copy threads."""
    import asyncio

    from inspector.app import KvscopeApp
    from runtime.engine import Engine, EngineConfig

    async def quit_with_ctrl_q(app: KvscopeApp) -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("ctrl+q")
            await pilot.pause(0.2)
            assert not app.is_running

    before = set(threading.enumerate())
    for screen in ("chat", "inspect"):
        engine = Engine(tiny_dsa, EngineConfig(device="cpu"))
        app = KvscopeApp(engine, screen, max_new_tokens=4)
        asyncio.run(quit_with_ctrl_q(app))  # joins the executor's worker threads
        assert app.return_code in (None, 0)
        engine.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
        left = [t for t in left if t.name.startswith(("kv-", "kvscope-"))]
        if not left:
            break
        time.sleep(0.05)
    assert not left, [t.name for t in left]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
@pytest.mark.parametrize(
    "mode,stop,want", [("chat", "C-q", 0), ("inspect", "C-q", 0)] + [("chat", "SIGTERM", 143)]
)
def test_tui_process_quits_on_ctrl_q_with_exit_0(tmp_path, tiny_dsa, mode, stop, want):
    """The real process under tmux: Ctrl+Q -> exit status 0 (written by the shell); SIGTERM
    -> the app quits (terminal restored) with 143."""
    sock, status = str(tmp_path / "tmux.sock"), tmp_path / "status"
    env = _env(tmp_path)
    cmd = f"{KVSCOPE} {mode} --model {tiny_dsa} --device cpu; echo $? > {status}; "
    cmd += f"stty -a > {tmp_path / 'stty'}; sleep 30"  # the pane's tty as the app left it
    tmux = ["tmux", "-S", sock]
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "30", cmd], env=env, check=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the app has drawn its screen
            screen = subprocess.run(
                [*tmux, "capture-pane", "-p"], capture_output=True, text=True
            ).stdout
            if "Quit" in screen or "quit" in screen:
                break
            assert time.monotonic() < deadline, screen
            time.sleep(0.5)
        if stop == "SIGTERM":
            shell = subprocess.run(
                [*tmux, "list-panes", "-F", "#{pane_pid}"], capture_output=True, text=True
            ).stdout.split()[0]
            child = subprocess.run(["pgrep", "-P", shell], capture_output=True, text=True)
            os.kill(int(child.stdout.split()[0]), signal.SIGTERM)
        else:
            subprocess.run([*tmux, "send-keys", stop], check=True)
        deadline = time.monotonic() + 60
        while not status.exists() or not status.read_text().strip():
            assert time.monotonic() < deadline, "the app did not quit"
            time.sleep(0.2)
        assert status.read_text().strip() == str(want)
        # the app restored the terminal: a killed Textual app leaves the tty raw (-icanon)
        deadline = time.monotonic() + 10
        while not (tmp_path / "stty").exists() or not (tmp_path / "stty").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert " icanon" in (tmp_path / "stty").read_text()
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


BACKSTOP = """
import sys, time
from runtime.engine import Engine, EngineConfig
from runtime.models.cpu_graph import bucket_of
engine = Engine(sys.argv[1], EngineConfig(device="cpu", page_size=4))
engine.cpu_graph.request(bucket_of(1, 8))
deadline = time.monotonic() + 60
while not engine.cpu_graph._compiling and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(15)  # inside fake-tensor tracing: the old daemon thread crashed here (134)
print("compiling" if engine.cpu_graph._compiling else "idle", flush=True)
# the script ends here: no Engine.close(), no app/shutdown
"""


def test_a_script_ending_during_a_compile_exits_0(tmp_path, tiny_dsa):
    """Without the CLI: the interpreter's own exit abandons the compile (non-daemon thread,
    threading._register_atexit) instead of aborting in std::terminate."""
    run = subprocess.run(
        [sys.executable, "-c", BACKSTOP, str(tiny_dsa)],
        env=_env(tmp_path, KVSCOPE_CPU_GRAPH="1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "compiling"
    assert "terminate" not in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize(
    "mode",
    [
        ["bench", "--peers", "none", "--repeats", "1", "--warmup", "1", "--prompt-len", "8"]
        + ["--decode-tokens", "4", "--no-cached", "--threads", "1"],
        ["chaos", "--requests", "2", "--max-new-tokens", "4", "--clean-only"],
    ],
    ids=["bench", "chaos"],
)
def test_other_modes_exit_0_without_a_traceback(tmp_path, tiny_dsa, mode):
    """bench and chaos end through the same shutdown path as batch: status 0 and nothing on
    stderr that looks like a crash (progress lines are fine)."""
    cmd = [KVSCOPE, mode[0], "--model", str(tiny_dsa), "--device", "cpu", *mode[1:]]
    run = subprocess.run(
        cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for crash in ("Traceback", "terminate called", "Aborted", "Segmentation"):
        assert crash not in run.stderr, run.stderr[-2000:]
