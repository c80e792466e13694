"""BatchProgress: the `kvscope batch` progress bar and end summary, on a fake clock."""

from __future__ import annotations

import io

from app.batch_progress import BatchProgress


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_bar_and_summary_on_a_terminal():
    out, clock = io.StringIO(), Clock()
    with BatchProgress(2, stream=out, clock=clock, tty=True, width=10) as p:
        clock.t += 1.0
        p.add_tokens(30)
        assert "0/2 req  30 tok  30.0 tok/s" in p.bar_line()
        p.request_done(prompt_tokens=40, completion_tokens=30, cached_tokens={"L1": 16},
                       verdict="ok")  # fmt: skip
        assert "█████░░░░░ 1/2 req" in p.bar_line() and "ETA 0:01" in p.bar_line()
        clock.t += 1.0
        p.add_tokens(10)
        cached = {"L1": 0, "L2": 16}
        p.request_done(
            prompt_tokens=20, completion_tokens=10, cached_tokens=cached, verdict="suspect",
            violations=2,
        )  # fmt: skip
    text = out.getvalue()
    assert text.count("\r\x1b[2K") >= 3  # redrawn in place
    assert "2/2 req  40 tok  20.0 tok/s" in text
    assert "kvscope batch: 2 requests, 2 done, 0 errors in 2.0 s" in text
    assert "cached prompt tokens: L1 16 · L2 16 · L3 0 (53.3% of prompt)" in text
    assert "integrity: ok 1 · suspect 1 · corrupt 0 · violations 2" in text
    assert p.summary() == {
        "requests": 2, "completed": 2, "errors": 0, "prompt_tokens": 60,
        "completion_tokens": 40, "cached_tokens": {"L1": 16, "L2": 16, "L3": 0},
        "verdicts": {"ok": 1, "suspect": 1, "corrupt": 0}, "violations": 2,
        "seconds": 2.0, "tok_per_s": 20.0,
    }  # fmt: skip


def test_not_a_terminal_logs_lines_sparingly():
    out, clock = io.StringIO(), Clock()
    p = BatchProgress(3, stream=out, clock=clock, tty=False, log_interval=10.0)
    p.draw()
    for _ in range(50):
        clock.t += 0.1
        p.add_tokens(1)  # 5 s: no new line yet
    assert out.getvalue().count("\n") == 1 and "\r" not in out.getvalue()
    clock.t += 6
    p.request_failed()  # past the interval: one more line
    assert out.getvalue().count("\n") == 2 and "errors 1" in out.getvalue()
    summary = p.close()
    assert p.close() == summary and out.getvalue().count("kvscope batch:") == 1
    assert "3 requests, 0 done, 1 errors" in summary


def test_zero_requests():
    out = io.StringIO()
    with BatchProgress(0, stream=out, clock=Clock(), tty=False) as p:
        assert "0/0 req" in p.bar_line()
    assert "0 requests" in out.getvalue()
