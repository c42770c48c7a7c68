"""Authentication: bearer JWTs for users, a shared service token for the host app.

The algorithm comes from configuration and is the only one accepted, so a token
saying `alg: none` or switching HS256/RS256 is refused. `exp` is required; the
issuer and audience are checked when configured. The token's `sub` must be a
provisioned user of the token's `tenant`; otherwise the token is refused the
same way whether the user is missing or belongs to another tenant.
"""

from __future__ import annotations

import hmac
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cachetools import TLRUCache
from jwt.exceptions import InvalidSubjectError
from sqlalchemy.orm import Session

from app.models import User
from app.problems import Unauthorized
from app.settings import Settings
from app.validation import is_external_id

# A compact JWS: three base64url segments (the signature may be empty, as with alg none,
# which the algorithm check refuses). Checked first so that PyJWT's own wording for a
# malformed token ("Not enough segments", "Invalid header padding") never reaches a client.
_COMPACT_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*", re.ASCII)
MAX_TOKEN_LENGTH = 8192
# `exp` must name an instant a datetime can hold: a second before year 10000 (UTC).
MAX_EXP = 253_402_300_799

_MALFORMED = "The token is malformed."


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    tenant_id: str
    expires_at: datetime


def _refuse(message: str, code: str = "invalid_token") -> Unauthorized:
    return Unauthorized(message, code=code)


#: Verified tokens kept per process: a client sends the same token with every request
#: for its lifetime, and checking its signature again each time is wasted work.
VERIFIED_TOKENS_KEPT = 4096


def _wall_clock() -> float:
    return time.time()


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.jwt_verification_key
        self._algorithms = [settings.jwt_algorithm]
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_seconds
        # Only tokens that passed every check, each until its own `exp` (then it is
        # checked again, leeway and all); a refusal is never kept, so a token cannot be
        # "remembered" as valid by anything but a successful verification.
        self._verified: TLRUCache[str, TokenClaims] = TLRUCache(
            maxsize=VERIFIED_TOKENS_KEPT,
            ttu=lambda _token, claims, _now: claims.expires_at.timestamp(),
            timer=_wall_clock,
        )
        self._lock = threading.Lock()

    def verify(self, token: str) -> TokenClaims:
        """Return the token's claims, or raise `Unauthorized` saying what is wrong."""
        with self._lock:
            claims = self._verified.get(token)
        if claims is not None:
            return claims
        claims = self._verify(token)
        with self._lock:
            self._verified[token] = claims
        return claims

    def _verify(self, token: str) -> TokenClaims:
        """The checks themselves. A correctly signed token may still carry claims of any
        JSON type: each one we use is type-checked here, so an odd one is a 401, never
        an error further on."""
        if len(token) > MAX_TOKEN_LENGTH or not _COMPACT_TOKEN.fullmatch(token):
            raise _refuse(_MALFORMED)
        options = {"require": ["exp", "sub"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise _refuse("The token has expired.", "token_expired") from None
        except jwt.InvalidAudienceError:
            raise _refuse("The token's audience is not accepted.", "invalid_audience") from None
        except jwt.InvalidIssuerError:
            raise _refuse("The token's issuer is not accepted.", "invalid_issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _refuse(f"The token lacks the required claim '{exc.claim}'.") from None
        except jwt.InvalidAlgorithmError:
            raise _refuse("The token's algorithm is not accepted.") from None
        except jwt.InvalidSignatureError:
            raise _refuse("The token's signature is invalid.") from None
        except jwt.ImmatureSignatureError:
            raise _refuse("The token is not valid yet.") from None
        except jwt.InvalidIssuedAtError:
            raise _refuse("The token's 'iat' claim must be a number.") from None
        except InvalidSubjectError:
            raise _refuse("The token's 'sub' claim must be a user id.") from None
        except jwt.PyJWTError:
            # Bad base64 or JSON, a header or claim of the wrong type: PyJWT's wording
            # ("Not enough segments", "Invalid header padding") means nothing to a person.
            raise _refuse(_MALFORMED) from None

        return TokenClaims(
            user_id=_identity_claim(claims, "sub", "user id"),
            tenant_id=_identity_claim(claims, "tenant", "tenant id"),
            expires_at=_expiry(claims.get("exp")),
        )


def _identity_claim(claims: dict[str, Any], name: str, what: str) -> str:
    """`sub` or `tenant`: an id as the admin API accepts them, so no NUL, space or
    oversized value reaches the user look-up (and with it SQL)."""
    value = claims.get(name)
    if not is_external_id(value):
        raise _refuse(
            f"The token's '{name}' claim must be a {what}: 1 to 128 letters, digits or . _ : @ + -."
        )
    return value


def _expiry(exp: Any) -> datetime:
    # PyJWT accepts anything int() takes ("1999999999" as a string, 1e20); we take only a
    # JSON number a datetime can hold.
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not 0 <= exp <= MAX_EXP:
        raise _refuse("The token's 'exp' claim must be a time in seconds since 1970.")
    return datetime.fromtimestamp(exp, UTC)


def parse_bearer(header: str | None) -> str:
    if not header:
        raise Unauthorized(
            "An 'Authorization: Bearer <token>' header is required.", code="missing_token"
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "The Authorization header must be 'Bearer <token>'.", code="missing_token"
        )
    return token.strip()


def load_user(session: Session, claims: TokenClaims) -> User:
    """The provisioned user the token speaks for, in the token's tenant."""
    user = session.get(User, claims.user_id)
    if user is None or user.tenant_id != claims.tenant_id:
        raise Unauthorized("The token's user is not known in its tenant.", code="unknown_user")
    return user


def check_service_token(settings: Settings, header: str | None) -> None:
    token = parse_bearer(header)
    if not hmac.compare_digest(token.encode(), settings.service_token.encode()):
        raise Unauthorized("The service token is invalid.", code="invalid_service_token")


def mint_token(
    settings: Settings, user_id: str, tenant_id: str, *, ttl: timedelta = timedelta(hours=12)
) -> str:
    """A development token signed with the configured HMAC secret."""
    if settings.jwt_secret is None:
        raise ValueError(
            "minting needs SWITCHBOARD_JWT_SECRET (an HS* algorithm); with a public "
            "key only the host app, which holds the private key, can mint tokens"
        )
    now = datetime.now(UTC)
    claims: dict[str, object] = {"sub": user_id, "tenant": tenant_id, "iat": now, "exp": now + ttl}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, settings.jwt_secret, algorithm=settings.jwt_algorithm)
