"""Authentication: bearer JWTs for users, a shared service token for the host app.

The algorithm comes from configuration and is the only one accepted, so a token
saying `alg: none` or switching HS256/RS256 is refused. `exp` is required; the
issuer and audience are checked when configured. The token's `sub` must be a
provisioned user of the token's `tenant`; otherwise the token is refused the
same way whether the user is missing or belongs to another tenant.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt
from sqlalchemy.orm import Session

from app.models import User
from app.problems import Unauthorized
from app.settings import Settings

MAX_CLAIM_LENGTH = 128


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    tenant_id: str
    expires_at: datetime


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self._key = settings.jwt_verification_key
        self._algorithms = [settings.jwt_algorithm]
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_seconds

    def verify(self, token: str) -> TokenClaims:
        """Return the token's claims, or raise `Unauthorized` saying what is wrong."""
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
            raise Unauthorized("The token has expired.", code="token_expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized(
                "The token's audience is not accepted.", code="invalid_audience"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthorized(
                "The token's issuer is not accepted.", code="invalid_issuer"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(
                f"The token lacks the required claim '{exc.claim}'.", code="invalid_token"
            ) from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized(
                "The token's algorithm is not accepted.", code="invalid_token"
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("The token's signature is invalid.", code="invalid_token") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"The token is invalid: {exc}.", code="invalid_token") from None

        user_id, tenant_id = claims.get("sub"), claims.get("tenant")
        for name, value in (("sub", user_id), ("tenant", tenant_id)):
            if not isinstance(value, str) or not value or len(value) > MAX_CLAIM_LENGTH:
                raise Unauthorized(
                    f"The token's '{name}' claim must be a non-empty string.", code="invalid_token"
                )
        return TokenClaims(user_id, tenant_id, datetime.fromtimestamp(claims["exp"], UTC))


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
