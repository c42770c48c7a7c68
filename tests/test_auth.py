"""Every way a bearer token is refused, and the one way it is accepted."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from tests.conftest import JWT_SECRET


def encode(claims: dict, key: str = JWT_SECRET, algorithm: str = "HS256", **headers) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers or None)


def claims_for(user, **changes) -> dict:
    claims = {
        "sub": user.id,
        "tenant": user.tenant_id,
        "exp": datetime.now(UTC) + timedelta(minutes=5),
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


@pytest.fixture
def whoami() -> str:
    return "/v1/me"


def get(client, path, token=None, header=None):
    headers = {}
    if header is not None:
        headers["Authorization"] = header
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return client.get(path, headers=headers)


def test_valid_token_is_accepted(client, make_user, whoami):
    user = make_user("alice", tenant="t1")
    response = get(client, whoami, encode(claims_for(user)))
    assert response.status_code == 200
    assert response.json["id"] == "alice"
    assert response.json["tenant"] == "t1"


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer   "])
def test_missing_or_malformed_header(client, make_user, whoami, header):
    make_user("alice")
    response = client.get(whoami, headers={} if header is None else {"Authorization": header})
    assert response.status_code == 401
    assert response.json["error"]["code"] == "missing_token"


def test_bad_signature(client, make_user, whoami):
    user = make_user("alice")
    response = get(client, whoami, encode(claims_for(user), key="another-secret" * 4))
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_token"
    assert "signature" in response.json["error"]["message"]


def test_alg_none_is_refused(client, make_user, whoami):
    user = make_user("alice")
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    payload = claims_for(user)
    payload["exp"] = int(payload["exp"].timestamp())
    body = base64.urlsafe_b64encode(json.dumps(payload).encode())
    token = header.rstrip(b"=").decode() + "." + body.rstrip(b"=").decode() + "."
    response = get(client, whoami, token)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_token"


def test_other_algorithm_than_configured_is_refused(client, make_user, whoami):
    user = make_user("alice")
    response = get(client, whoami, encode(claims_for(user), algorithm="HS512"))
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_token"


def test_expired(client, make_user, whoami):
    user = make_user("alice")
    token = encode(claims_for(user, exp=datetime.now(UTC) - timedelta(minutes=5)))
    response = get(client, whoami, token)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "token_expired"


def test_exp_is_required(client, make_user, whoami):
    user = make_user("alice")
    token = encode({"sub": user.id, "tenant": user.tenant_id})
    response = get(client, whoami, token)
    assert response.status_code == 401
    assert "exp" in response.json["error"]["message"]


def test_garbage_token(client, whoami):
    response = get(client, whoami, "not.a.jwt")
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_token"


@pytest.mark.parametrize("claim", ["sub", "tenant"])
def test_non_string_identity_claims(client, make_user, whoami, claim):
    user = make_user("alice")
    response = get(client, whoami, encode(claims_for(user, **{claim: 42})))
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_token"


def test_wrong_tenant(client, make_user, whoami):
    make_user("alice", tenant="t1")
    make_user("mallory", tenant="t2")
    token = encode(
        {"sub": "alice", "tenant": "t2", "exp": datetime.now(UTC) + timedelta(minutes=5)}
    )
    response = get(client, whoami, token)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unknown_user"


def test_unknown_user(client, whoami):
    token = encode(
        {"sub": "ghost", "tenant": "t1", "exp": datetime.now(UTC) + timedelta(minutes=5)}
    )
    response = get(client, whoami, token)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unknown_user"


def test_issuer_and_audience_are_checked_when_configured(app_factory, make_user, clean_state):
    app = app_factory(
        SWITCHBOARD_JWT_ISSUER="https://host.example", SWITCHBOARD_JWT_AUDIENCE="switchboard"
    )
    alice = make_user("alice")
    client = app.test_client()
    good = claims_for(alice, iss="https://host.example", aud="switchboard")
    assert get(client, "/v1/me", encode(good)).status_code == 200

    wrong_aud = dict(good, aud="someone-else")
    response = get(client, "/v1/me", encode(wrong_aud))
    assert (response.status_code, response.json["error"]["code"]) == (401, "invalid_audience")

    no_aud = {k: v for k, v in good.items() if k != "aud"}
    assert get(client, "/v1/me", encode(no_aud)).status_code == 401

    wrong_iss = dict(good, iss="https://evil.example")
    response = get(client, "/v1/me", encode(wrong_iss))
    assert (response.status_code, response.json["error"]["code"]) == (401, "invalid_issuer")


def test_rs256_with_a_public_key(app_factory, make_user, clean_state):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    app = app_factory(
        SWITCHBOARD_JWT_ALGORITHM="RS256",
        SWITCHBOARD_JWT_PUBLIC_KEY=public_pem,
        SWITCHBOARD_JWT_SECRET="",
    )
    make_user("alice")
    client = app.test_client()
    claims = {"sub": "alice", "tenant": "t1", "exp": datetime.now(UTC) + timedelta(minutes=5)}
    assert get(client, "/v1/me", encode(claims, key=private, algorithm="RS256")).status_code == 200
    # With RS256 configured, an HMAC-signed token is refused whatever its key.
    response = get(client, "/v1/me", encode(claims, algorithm="HS256", key="x" * 40))
    assert (response.status_code, response.json["error"]["code"]) == (401, "invalid_token")


def test_a_verified_token_is_kept_until_it_expires_and_a_refused_one_never(monkeypatch):
    """The signature is checked once per token and process, not once per request; an
    entry goes at the token's `exp` (then the full check answers token_expired), and a
    refusal is checked anew every time."""
    from app.auth import TokenVerifier
    from app.problems import Unauthorized
    from app.settings import load_settings
    from tests.conftest import SERVICE_TOKEN

    settings = load_settings(
        {
            "DATABASE_URL": "postgresql://unused/db",
            "REDIS_URL": "redis://unused:6379/0",
            "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
            "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
            "SWITCHBOARD_JWT_LEEWAY_SECONDS": "0",
        }
    )
    clock = [datetime.now(UTC).timestamp()]
    monkeypatch.setattr("app.auth._wall_clock", lambda: clock[0])
    verifier = TokenVerifier(settings)
    decoded: list[str] = []
    real_decode = jwt.decode

    def counting_decode(token, *args, **kwargs):
        decoded.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr("app.auth.jwt.decode", counting_decode)
    exp = datetime.now(UTC) + timedelta(seconds=60)
    token = encode({"sub": "alice", "tenant": "t1", "exp": exp})
    first, second = verifier.verify(token), verifier.verify(token)
    assert first == second and first.user_id == "alice" and len(decoded) == 1

    bad = encode({"sub": "alice", "tenant": "t1", "exp": exp}, key="x" * 40)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.verify(bad)
    assert len(decoded) == 3

    # Past its exp the kept entry is gone and the full check refuses the token.
    clock[0] = exp.timestamp() + 1
    monkeypatch.setattr("jwt.api_jwt.datetime", _FrozenDatetime(clock[0]))
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token)
    assert len(decoded) == 4


class _FrozenDatetime:
    """PyJWT's `datetime`, stopped at a moment (it reads datetime.now(tz=timezone.utc))."""

    def __init__(self, moment: float) -> None:
        self._moment = moment

    def now(self, tz=None):
        return datetime.fromtimestamp(self._moment, tz)

    def __getattr__(self, name):
        return getattr(datetime, name)
