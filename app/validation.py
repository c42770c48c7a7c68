"""Shapes of identifiers shared by the API and the services."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import StringConstraints

# Host-app ids: no whitespace and no '|', which joins a pair of ids into a conversation key.
EXTERNAL_ID_PATTERN = r"^[A-Za-z0-9._:@+\-]{1,128}$"
_EXTERNAL_ID = re.compile(EXTERNAL_ID_PATTERN, re.ASCII)

ExternalId = Annotated[str, StringConstraints(pattern=EXTERNAL_ID_PATTERN)]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


def is_external_id(value: object) -> bool:
    """Whether `value` is a host-app id (a user or tenant id). `fullmatch`, because with
    `match` the pattern's `$` would also accept a trailing newline."""
    return isinstance(value, str) and _EXTERNAL_ID.fullmatch(value) is not None
