"""Shapes of identifiers shared by the API and the services."""

from __future__ import annotations

from typing import Annotated

from pydantic import StringConstraints

# Host-app ids: no whitespace and no '|', which joins a pair of ids into a conversation key.
EXTERNAL_ID_PATTERN = r"^[A-Za-z0-9._:@+\-]{1,128}$"

ExternalId = Annotated[str, StringConstraints(pattern=EXTERNAL_ID_PATTERN)]
DisplayName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
