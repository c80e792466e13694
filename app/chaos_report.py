"""`kvscope chaos`'s per-kind figures and its table.

One row per fault kind: injected, changed (the bytes a request read differed from the correct
ones; compared, runtime/integrity/ledger.py) and the share changed/injected, one column per
detector (whatever names the ledger reports: adding a detector adds a column), the detection
delay in engine steps, recovered, prevented, and against the clean run the corrupt tokens
emitted and the clean tokens.
"""

from __future__ import annotations


def kind_row(e, kind: str, res: dict, ref: dict, false_pos: int) -> dict:
    """The report of one kind's run `e` (an Engine, closed) whose requests are `res`; `ref`:
    prompt -> the clean run's tokens."""
    corrupt = clean = 0
    garbled = []
    for r in res.values():
        if r.finish_reason != "length":
            continue  # aborted by the injected timeout: nothing to compare
        want = ref[tuple(r.prompt_ids)]
        bad = sum(a != b for a, b in zip(r.output_ids, want, strict=False))
        bad += abs(len(r.output_ids) - len(want))
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
        for ex in row["garbled_examples"][:1]:
            print(f"[{kind}] garbled: {ex['got']!r}\n{'':>{len(kind) + 3}}clean:   {ex['want']!r}")
