"""The one reader of request JSONL files (`kvscope batch`, plain and --layer-split).

Each non-blank line becomes a ``RequestLine``: a request object, or the one-line error that its
output record carries (``{"id", "error"}``), naming the file, the line and the field. Checked
here, for every mode: UTF-8, a JSON object, known fields only, an ``id`` that is a string or an
integer, and ids unique in the file (a repeated id is an error record keyed ``line-N``, never a
silent overwrite of the first one's output). Mode-specific fields (sampling parameters,
greedy-only) are checked by the modes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import KvscopeError

FIELDS = frozenset(
    {"id", "prompt", "messages", "prompt_ids", "max_new_tokens", "temperature"}
    | {"top_p", "top_k", "seed", "stop"}
)
MAX_LINE_BYTES = 64 << 20  # a longer line is an error record (not read into one JSON parse)


@dataclass
class RequestLine:
    lineno: int  # 1-based line number in the file
    index: int  # 0-based position among the non-blank lines (= the output record's position)
    uid: object  # the user's id (str or int), or "line-N"
    rec: dict | None  # the request, or None when ``error`` is set
    error: str | None = None

    @property
    def key(self) -> str:
        """The id as the output file keys it (``--resume``): its JSON text."""
        return id_key(self.uid)


def id_key(uid) -> str:
    return json.dumps(uid, ensure_ascii=False)


class _BadLine(KvscopeError):
    def __init__(self, message: str, uid: object = None):
        super().__init__(message)
        self.uid = uid  # the line's id when it was readable


def _parse(raw: bytes, where: str) -> tuple[object, dict]:
    """(uid, request) of one line; raises KvscopeError with the reason."""
    if len(raw) > MAX_LINE_BYTES:
        raise KvscopeError(f"{where}: line longer than {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KvscopeError(f"{where}: not UTF-8 (byte {e.start})") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise KvscopeError(f"{where}: malformed JSON ({e.msg})") from None
    except RecursionError:
        raise KvscopeError(f"{where}: malformed JSON (nested too deeply)") from None
    if not isinstance(rec, dict):
        raise KvscopeError(f"{where}: line is not a JSON object")
    uid = rec.get("id")
    if "id" in rec and (not isinstance(uid, str | int) or isinstance(uid, bool)):
        raise KvscopeError(f"{where}: field 'id' must be a string or an integer")
    unknown = set(rec) - FIELDS
    if unknown:
        raise _BadLine(f"{where}: unknown field '{sorted(unknown)[0]}'", uid)
    return uid, rec


def read_requests(path: Path | str) -> Iterator[RequestLine]:
    """The request lines of ``path`` in order. Raises KvscopeError (exit 2) only when the file
    itself cannot be read; a bad line is a RequestLine with ``error`` set."""
    path = Path(path)
    try:
        src = path.open("rb")
    except OSError as e:
        raise KvscopeError(f"--input {path}: cannot read ({e.strerror})") from None
    seen: dict[str, int] = {}  # id key -> line of its first use
    index = 0
    with src:
        for lineno, raw in enumerate(src, 1):
            if not raw.strip():
                continue
            uid: object = f"line-{lineno}"
            try:
                got, rec = _parse(raw, f"{path}:{lineno}")
                if got is not None:
                    first = seen.setdefault(id_key(got), lineno)
                    if first != lineno:
                        raise KvscopeError(
                            f"{path}:{lineno}: duplicate id {id_key(got)} (first on line "
                            f"{first}); ids must be unique"
                        )
                    uid = got
                yield RequestLine(lineno, index, uid, rec)
            except KvscopeError as e:
                got = getattr(e, "uid", None)
                if got is not None and seen.setdefault(id_key(got), lineno) == lineno:
                    uid = got  # the error record keeps a readable, unique id
                yield RequestLine(lineno, index, uid, None, str(e))
            index += 1


# Characters that str.splitlines() and JavaScript treat as line ends: escaped in the output so
# that every reader sees one record per line (found by tests/fuzz).
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def json_line(rec: dict) -> str:
    """One output record: UTF-8 JSON on one line, whatever line-end characters it holds."""
    return json.dumps(rec, ensure_ascii=False).translate(_LINE_ENDS) + "\n"


def count_requests(path: Path | str) -> int:
    path = Path(path)
    try:
        with path.open("rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError as e:
        raise KvscopeError(f"--input {path}: cannot read ({e.strerror})") from None


def complete_ids(out: Path) -> set[str]:
    """``--resume``: the id keys of the complete records of an existing output file. A torn
    last line (no newline, or not a whole JSON object: the run was killed while writing it) is
    cut off the file so that appending goes on from the last whole record; a bad line before
    the last is an error (the file is not one of ours)."""
    try:
        data = out.read_bytes()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise KvscopeError(f"--output {out}: cannot read for --resume ({e.strerror})") from None
    ids: set[str] = set()
    good = 0  # bytes of whole records
    lines = data.split(b"\n")
    for n, raw in enumerate(lines):
        last = n == len(lines) - 1  # text after the last newline (empty if the file ends well)
        rec = None
        if not last:
            try:
                rec = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
        if isinstance(rec, dict) and "id" in rec:
            ids.add(id_key(rec["id"]))
            good += len(raw) + 1
            continue
        if not last and not raw.strip():  # a blank line between records
            good += len(raw) + 1
            continue
        if raw.strip() and not (last or n == len(lines) - 2 and not lines[-1]):
            raise KvscopeError(
                f"--output {out}:{n + 1}: not a kvscope output record; cannot --resume it"
            )
        break
    if good < len(data):
        with out.open("r+b") as f:
            f.truncate(good)
    return ids
