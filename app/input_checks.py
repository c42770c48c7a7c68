"""Checks on untrusted JSON and text, made where it enters (HTTP bodies and query
strings, socket frames) so that nothing hostile reaches the parser's recursion, the
services, PostgreSQL or a worker.

- Nesting is limited before parsing: the standard library's parser recurses once per
  level, so a few KB of `[` end in a RecursionError; no payload of ours nests beyond a
  handful of levels.
- Text may not hold NUL (PostgreSQL cannot store it in `text`) or unpaired surrogates
  (`"\\ud800"` is valid JSON but no UTF-8 can encode it, so hashing or storing it fails).
  Refusing both here, once, names the field in a 400 instead of failing later in a
  digest, a database write or a worker, where the client only sees a 500 or a send that
  never ends.

No Flask here: the API and the stream raise and answer the same `BadRequest`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.problems import BadRequest

MAX_JSON_DEPTH = 32

# The only characters that matter to nesting: brackets, and the quotes and backslashes
# that say whether a bracket is inside a string.
_STRUCTURAL = re.compile(r'["\\\[\]{}]')
_BAD_CHARACTER = re.compile("[\x00\ud800-\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_SHOWN_KEY_LENGTH = 40


def decode_json_text(data: bytes | str) -> str:
    """The text of a JSON document, detecting UTF-8/16/32 as `json.loads` does."""
    if isinstance(data, str):
        return data
    try:
        # surrogatepass, as json.loads does: encoded lone surrogates become text that
        # `check_text` then refuses with a message naming the field.
        return data.decode(json.detect_encoding(data), "surrogatepass")
    except UnicodeDecodeError:
        raise BadRequest("The JSON is not valid UTF-8 text.", code="invalid_json") from None


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Refuse (400 `json_too_deep`) JSON nesting arrays and objects deeper than `limit`.

    One pass over the structural characters, linear whatever the input (a regular
    expression matching whole strings backtracks quadratically on unterminated ones).
    Up to where the parser would stop on invalid JSON, it reads the same characters
    the same way, so it never counts fewer levels than the parser would recurse into."""
    depth, in_string, skip_before = 0, False, 0
    for match in _STRUCTURAL.finditer(text):
        position, character = match.start(), match.group()
        if position < skip_before:
            continue  # the character after a backslash in a string is escaped
        if in_string:
            if character == "\\":
                skip_before = position + 2
            elif character == '"':
                in_string = False
        elif character == '"':
            in_string = True
        elif character in "[{":
            depth += 1
            if depth > limit:
                raise BadRequest(
                    f"The JSON nests arrays and objects more than {limit} levels deep.",
                    code="json_too_deep",
                )
        elif character in "]}":
            depth -= 1


def _text_problem(text: str) -> str | None:
    found = _BAD_CHARACTER.search(text)
    if found is None:
        return None
    if found.group() == "\x00":
        return "must not contain NUL (\\u0000) characters"
    return "must not contain unpaired surrogates (\\ud800-\\udfff); send valid Unicode text"


def _child_path(parent: str, key: str) -> str:
    if _PLAIN_KEY.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    shown = key if len(key) <= _SHOWN_KEY_LENGTH else key[:_SHOWN_KEY_LENGTH] + "..."
    return f"{parent}[{json.dumps(shown)}]"


def check_text(value: Any, path: str = "") -> None:
    """Refuse (400 `invalid_text`, naming the JSON path such as `subject.id` or
    `items[2]`) any string or object key in `value` holding NUL or an unpaired surrogate."""
    pending: list[tuple[str, Any]] = [(path, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                raise BadRequest(f"{where or 'the value'}: {problem}.", code="invalid_text")
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = _text_problem(key)
                if problem:
                    # The key itself is not shown: it is the bad text.
                    raise BadRequest(
                        f"{where or 'the object'}: a key {problem}.", code="invalid_text"
                    )
                pending.append((_child_path(where, key), child))
        elif isinstance(item, list):
            pending.extend((f"{where}[{index}]", child) for index, child in enumerate(item))


def parse_untrusted_json(data: bytes | str) -> Any:
    """Parse JSON from a client: 400 `invalid_json` if it is not JSON, `json_too_deep`
    if it nests too deep, `invalid_text` if a string holds NUL or an unpaired surrogate."""
    text = decode_json_text(data)
    check_json_depth(text)
    try:
        payload = json.loads(text)
    except ValueError:
        raise BadRequest("The body is not valid JSON.", code="invalid_json") from None
    check_text(payload)
    return payload
