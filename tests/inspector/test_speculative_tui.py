"""The TUI's speculative decoding view: tokens styled by draft status on top of the verdict
colour, the token panel's verify step (drafted / accepted / rejected), accept length and rate in
the requests table and status line, acceptance events in the integrity log (FakeEngine)."""

from __future__ import annotations

from rich.style import Style
from textual.widgets import DataTable

from inspector.app import KvscopeApp
from inspector.format import ACCEPTANCE_STYLE, VERDICT_STYLE, draft_status, token_style
from inspector.transcript import verify_step
from inspector.widgets.reply import ReplyView
from inspector.widgets.status_line import StatusLine
from inspector.widgets.tables import event_counts
from inspector.widgets.token_detail import TokenDetail, describe_token
from runtime.telemetry import IntegrityEvent, TokenEvent, TokenVerdict
from tests.inspector.fake_engine import FakeEngine


def _ev(i: int, draft: str = "", rejected: int = 0, verdict="ok", reasons=()) -> TokenEvent:
    v = TokenVerdict(verdict, tuple(reasons), draft=draft, rejected=rejected)
    return TokenEvent("a", i, 100 + i, f" w{i}", v)


def test_token_style_keeps_the_verdict_colour_and_adds_the_draft_status():
    ok = Style.parse(VERDICT_STYLE["ok"])
    assert token_style(_ev(0).verdict) == ok
    acc = token_style(_ev(0, "accepted").verdict)
    assert acc.color == ok.color and acc.underline and not acc.italic
    after_reject = token_style(_ev(0, "target", 2).verdict)
    assert after_reject.color == ok.color and after_reject.italic and not after_reject.underline
    bonus = token_style(_ev(0, "target", 0).verdict)  # every draft accepted: plain
    assert bonus == ok and draft_status(_ev(0, "target", 0).verdict) == ""
    corrupt = token_style(_ev(0, "accepted", verdict="corrupt", reasons=["epoch"]).verdict)
    assert corrupt.bgcolor == Style.parse(VERDICT_STYLE["corrupt"]).bgcolor and corrupt.underline
    # suspect only by the acceptance detector: a colour of its own; with another reason: yellow
    flagged = _ev(0, "target", 1, "suspect", ["acceptance: accept length 1.10 < 1.4"]).verdict
    assert token_style(flagged).bgcolor == Style.parse(ACCEPTANCE_STYLE).bgcolor
    both = _ev(0, "", 0, "suspect", ["acceptance: x", "shadow max |dlogit| 0.4"]).verdict
    assert token_style(both).bgcolor == Style.parse(VERDICT_STYLE["suspect"]).bgcolor


def test_verify_step_counts_and_token_detail():
    # prefill token, a step accepting 2 of 2, a step rejecting 2 of 2, one accepting 1 of 2
    toks = [_ev(0), _ev(1, "accepted"), _ev(2, "accepted"), _ev(3, "target", 0)]
    toks += [_ev(4, "target", 2), _ev(5, "accepted"), _ev(6, "target", 1)]
    assert verify_step(toks, 0) is None
    assert [verify_step(toks, i) for i in (1, 2, 3)] == [(2, 2, 0)] * 3
    assert verify_step(toks, 4) == (2, 0, 2)
    assert verify_step(toks, 5) == verify_step(toks, 6) == (2, 1, 1)
    text = describe_token(toks[5], verify_step(toks, 5)).plain
    assert "MTP draft, accepted by the target" in text
    assert "verify step: drafted 2 · accepted 1 · rejected 1" in text and "underlined" in text
    text = describe_token(toks[4], verify_step(toks, 4)).plain
    assert "target's own token (2 draft(s) rejected)" in text and "rejected 2" in text
    assert "speculation" not in describe_token(toks[0]).plain
    flagged = _ev(6, "target", 1, "suspect", ["acceptance: accept length 1.10 < 1.4 (garbled)"])
    assert "• acceptance: accept length 1.10" in describe_token(flagged).plain


def test_acceptance_events_counted_apart_from_violations():
    events = (
        IntegrityEvent(0.1, "a", "acceptance", "accept length 1.1 < 1.4", ()),
        IntegrityEvent(0.2, "b", "checksum", "y", (1,)),
    )
    text = event_counts(events).plain
    assert text.startswith("violations 1 ·") and "acceptance 1" in text


def test_fake_engine_draft_tags_match_its_stats():
    engine = FakeEngine(seed=5, draft_tokens=3, accept_p=0.6)
    rids = [engine.submit(f"prompt {i}", max_new_tokens=30) for i in range(3)]
    tokens: dict[str, list[TokenEvent]] = {r: [] for r in rids}
    while engine.has_work():
        for ev in engine.step():
            tokens[ev.request_id].append(ev)
    infos = {r.request_id: r for r in engine.snapshot().requests}
    for rid, toks in tokens.items():
        tags = [t.verdict.draft for t in toks]
        assert tags[0] == "" and all(tags[1:])  # the prefill's token, then verify steps only
        steps, accepted = tags.count("target"), tags.count("accepted")
        rejected = sum(t.verdict.rejected for t in toks)
        assert accepted + rejected == 3 * steps
        assert infos[rid].accept_length == round((accepted + steps) / steps, 6)
        assert infos[rid].accept_rate == round(accepted / (3 * steps), 6)
    assert {t.verdict.rejected for ts in tokens.values() for t in ts} > {0}


def quiet(app: KvscopeApp) -> KvscopeApp:
    app.animation_level = "none"
    return app


async def test_chat_and_inspector_show_speculation(send, wait_for):
    # a minimum accept length of 5 with 2 drafts flags every token from the 4th on
    engine = FakeEngine(seed=7, draft_tokens=2, accept_min_length=5.0, accept_after=4)
    app = quiet(KvscopeApp(engine))
    async with app.run_test(size=(120, 34)) as pilot:
        await send(pilot, "draft some tokens")
        await wait_for(pilot, lambda: app.session.turns and app.session.active is None)
        reply = app.session.reply("chat-1")
        view = app.screen.query_one(ReplyView)
        rendered = view.render()
        for i, tok in enumerate(reply.tokens):  # each token's span carries its styles
            spans = [s for s in rendered.spans if isinstance(s.style, Style)]
            style = next(s.style for s in spans if s.style.meta.get("token") == i)
            assert bool(style.underline) == (tok.verdict.draft == "accepted"), i
            assert bool(style.italic) == (draft_status(tok.verdict) == "rejected"), i
            flagged = any(r.startswith("acceptance: ") for r in tok.verdict.reasons)
            assert flagged == (i >= 3 and tok.verdict.draft != ""), i
            if flagged:
                assert style.bgcolor == Style.parse(ACCEPTANCE_STYLE).bgcolor
        # select an accepted draft in the transcript: the panel shows its verify step
        idx = next(i for i, t in enumerate(reply.tokens) if t.verdict.draft == "accepted")
        await pilot.press("tab")
        view.cursor = idx
        await pilot.pause()
        detail = str(app.screen.query_one(TokenDetail).render())
        drafted, accepted, rejected = verify_step(reply.tokens, idx)
        assert f"verify step: drafted {drafted} · accepted {accepted} · rejected {rejected}" in (
            detail
        )
        await wait_for(pilot, lambda: any(r.status == "finished" for r in app.snapshot.requests))
        info = next(r for r in app.snapshot.requests if r.request_id == "chat-1")
        assert info.accept_length is not None
        await pilot.pause()
        status = str(app.screen.query_one(StatusLine).render())
        assert f"accept {info.accept_length:.2f} ({info.accept_rate:.0%})" in status
        await pilot.press("f2", "3")
        await pilot.pause()
        table = app.screen.query_one("#requests-table", DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        row = dict(zip(labels, map(str, table.get_row("chat-1")), strict=True))
        assert row["acc len"] == f"{info.accept_length:.2f}"
        assert row["acc %"] == f"{info.accept_rate:.0%}"
        assert row["verdict"] == "suspect"
        await pilot.press("4")
        await pilot.pause()
        log = app.screen.query_one("#integrity-table", DataTable)
        rows = [log.get_row_at(i) for i in range(log.row_count)]
        acc = [r for r in rows if str(r[2]) == "acceptance"]
        assert len(acc) == 1 and acc[0][1] == "chat-1" and "accept length" in acc[0][4]
        assert acc[0][2].style == "dark_orange"
        counts = str(app.screen.query_one("#integrity-counts").render())
        assert "acceptance 1" in counts
