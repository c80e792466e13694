"""`kvscope chaos`'s per-kind figures and its table.

One row per fault kind: injected, changed (the bytes a request read differed from the correct
ones; compared, runtime/integrity/ledger.py) and the share changed/injected, one column per
detector (whatever names the ledger reports: adding a detector adds a column), the detection
delay in engine steps, recovered, prevented, and against the clean run the corrupt tokens
emitted and the clean tokens.
"""

from __future__ import annotations


def corrupt_tokens(got, want) -> int:
    """Tokens of `got` that differ from the clean run's `want`, a length difference included."""
    return sum(a != b for a, b in zip(got, want, strict=False)) + abs(len(got) - len(want))


def kind_row(e, kind: str, res: dict, ref: dict, false_pos: int) -> dict:
    """The report of one kind's run `e` (an Engine, closed) whose requests are `res`; `ref`:
    prompt -> the clean run's tokens."""
    corrupt = clean = 0
    garbled = []
    for r in res.values():
        if r.finish_reason != "length":
            continue  # aborted by the injected timeout: nothing to compare
        want = ref[tuple(r.prompt_ids)]
        bad = corrupt_tokens(r.output_ids, want)
        corrupt += bad
        clean += len(r.output_ids) - min(bad, len(r.output_ids))
        if bad and len(garbled) < 3 and e.tokenizer is not None:
            garbled.append({"got": r.text, "want": e.tokenizer.decode(want)})
    row = e.monitor.faults.ledger.report(kind)
    if kind == "host-bitflip":
        row["extra"]["load_failures"] = e.kv.tiers.load_failures
    if kind == "disk-corrupt" and e.kv.disk is not None:
        row["extra"]["l3_rejected"] = e.kv.disk.stats["rejected"]
    row |= {
        "corrupt_tokens_emitted": corrupt,
        "false_positives": false_pos,
        "clean_tokens": clean,
        "garbled_examples": garbled,
    }
    return row


def _accept_rule(detail: str) -> str:
    return "garbled" if detail.startswith("accept length") else "looping"


def _acceptance_by_request(events) -> dict[str, set[str]]:
    by_rid: dict[str, set[str]] = {}
    for ev in events:
        if ev.kind == "acceptance":
            by_rid.setdefault(ev.request_id, set()).add(_accept_rule(ev.detail))
    return by_rid


def acceptance_by_prompt(res: dict, events) -> dict[tuple, set[str]]:
    """prompt -> the acceptance rules (garbled / looping) the detector raised for it (for a
    prompt sent more than once, for any of its requests)."""
    by_rid, out = _acceptance_by_request(events), {}
    for rid, r in res.items():
        out.setdefault(tuple(r.prompt_ids), set()).update(by_rid.get(rid, set()))
    return out


def acceptance_vs_clean(res: dict, events, ref: dict, clean_accept: dict) -> dict:
    """The acceptance detector on a faulted run, request by request against the same prompt's
    clean run: a rule it raised here and not there is a flag the fault caused. Counts the
    requests whose tokens the fault changed (garbled) and those of them it flagged so (by the
    garbled rule, by the looping rule), and its new flags on requests the fault left intact."""
    flags = _acceptance_by_request(events)
    out = {"garbled_requests": 0, "flagged": 0, "by_rule": {"garbled": 0, "looping": 0}}
    out["flagged_intact"] = 0
    for rid, r in res.items():
        if r.finish_reason != "length":
            continue  # aborted by the injected timeout: nothing to compare
        key = tuple(r.prompt_ids)
        new = flags.get(rid, set()) - clean_accept.get(key, set())
        if corrupt_tokens(r.output_ids, ref[key]):
            out["garbled_requests"] += 1
            out["flagged"] += bool(new)
            for rule in new:
                out["by_rule"][rule] += 1
        elif new:
            out["flagged_intact"] += 1
    return out


def _cells(row: dict, detectors: list[str]) -> list[str]:
    frac = row["changed_frac"]
    delay = row["detection_delay_steps"]
    cells = [row["injected"], row["changed"], "-" if frac is None else f"{100 * frac:.0f}%"]
    cells += [row["detected_by"].get(d, 0) for d in detectors]
    cells.append("-" if delay["mean"] is None else f"{delay['mean']:g}/{delay['max']}")
    cells += [row["recovered"], row["prevented"], row["corrupt_tokens_emitted"]]
    return [str(c) for c in cells + [row["clean_tokens"]]]


def print_report(rep: dict) -> None:
    rows = rep["kinds"]
    detectors: list[str] = []
    for row in rows.values():
        detectors += [d for d in row["detected_by"] if d not in detectors]
    cols = ["injected", "changed", "changed%"] + [f"det:{d}" for d in detectors]
    cols += ["delay avg/max", "recovered", "prevented", "corrupt_tokens", "clean_tokens"]
    mode = "UNSAFE (protections off)" if rep["unsafe"] else "protections on"
    print(f"kvscope chaos: {rep['requests']} requests, {mode}")
    width = [max(len(c), 8) for c in cols]
    print(f"{'kind':<13}" + "".join(f" {c:>{w}}" for c, w in zip(cols, width, strict=True)))
    for kind, row in rows.items():
        cells = _cells(row, detectors)
        print(f"{kind:<13}" + "".join(f" {c:>{w}}" for c, w in zip(cells, width, strict=True)))
    print(
        "changed: injections whose bytes a request read differed from the correct ones; "
        "det:X: injections detector X caught; delay: engine steps from the fault's effect "
        "to its first detection"
    )
    print(f"overhead of the default checks on decode: {rep['overhead_pct']} %")
    flags = rep.get("clean", {}).get("acceptance_flags")
    if flags and sum(flags.values()):
        print(
            f"acceptance detector on the clean run: {flags['garbled']} requests judged "
            f"garbled (det:acceptance counts only these), {flags['looping']} looping"
        )
    graph = rep.get("clean", {}).get("decode_steps_cpu_graph")
    if graph and sum(graph.values()):
        print(
            f"timed decode steps: {graph['compiled']} through the compiled CPU graph, "
            f"{graph['eager']} eager"
        )
    for kind, row in rows.items():
        acc = row.get("acceptance_vs_clean")
        if acc and (acc["garbled_requests"] or acc["flagged_intact"]):
            rules = acc["by_rule"]
            print(
                f"[{kind}] acceptance vs the clean run: flagged {acc['flagged']} of "
                f"{acc['garbled_requests']} garbled requests ({rules['garbled']} by accept "
                f"length, {rules['looping']} by accept rate), {acc['flagged_intact']} intact"
            )
    for kind, row in rows.items():
        for ex in row["garbled_examples"][:1]:
            print(f"[{kind}] garbled: {ex['got']!r}\n{'':>{len(kind) + 3}}clean:   {ex['want']!r}")
