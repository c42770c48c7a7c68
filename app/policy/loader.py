"""Reading a policy: a preset shipped with the package, or a TOML file a deployment wrote.

Whatever is wrong with the input, the only exception that leaves here is `PolicyError`,
so start-up can print one line naming the bad key and stop.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from app.policy.engine import Policy
from app.policy.schema import PolicyModel, cross_check, describe_validation_error

PRESETS: tuple[str, ...] = ("bookstore", "cardshow", "marketplace")


class PolicyError(Exception):
    """The policy cannot be used. The message names the source, the key path and why,
    e.g. ``bookstore.toml: start_rules[1].to_roles: unknown role 'dealr'``."""

    def __init__(self, source: str, problems: Sequence[str] | None = None) -> None:
        # PolicyError("some message") also works, for callers raising it themselves.
        if problems is None:
            source, problems = "", (source,)
        self.source = source
        self.problems = tuple(problems)
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(self.problems))


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Parse and validate policy TOML text; `source` only labels error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [f"invalid TOML: {exc}"]) from None
    except TypeError:
        raise PolicyError(source, ["policy text must be a string"]) from None
    try:
        model = PolicyModel.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(source, describe_validation_error(exc)) from None
    problems = cross_check(model)
    if problems:
        raise PolicyError(source, problems)
    return Policy(model, source)


def _looks_like_path(name_or_path: str) -> bool:
    return name_or_path.endswith(".toml") or "/" in name_or_path or "\\" in name_or_path


def load_policy(name_or_path: str) -> Policy:
    """Load a preset by name (see `PRESETS`) or a policy file by path.

    A bare word is a preset name; anything ending in ``.toml`` or containing a path
    separator is a file, so a typo in a preset name is reported as such rather than
    as a missing file.
    """
    if name_or_path in PRESETS:
        resource = resources.files(__package__).joinpath("presets", f"{name_or_path}.toml")
        source = f"preset {name_or_path!r}"
        try:
            text = resource.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(source, [f"cannot read preset file: {exc}"]) from None
        return parse_policy(text, source)
    if not _looks_like_path(name_or_path):
        raise PolicyError(
            repr(name_or_path),
            [f"unknown preset (presets: {', '.join(PRESETS)}; or give a path to a .toml file)"],
        )
    path = Path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(path), ["file not found"]) from None
    except UnicodeDecodeError:
        raise PolicyError(str(path), ["file is not valid UTF-8 text"]) from None
    except OSError as exc:
        raise PolicyError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    return parse_policy(text, str(path))
