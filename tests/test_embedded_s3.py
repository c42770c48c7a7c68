"""The S3 store the tests (and `switchboard up`) use: an embedded SeaweedFS that starts,
keeps its data and keys across a restart, and enforces presigned POST policies the way
AWS S3 does, so upload tests against it mean something."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.embedded import SEAWEED_PORTS, EmbeddedServerError, SeaweedServer, port_is_free

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 56  # the bytes only need to be there
LIMIT = 1024


def multipart(fields: dict[str, str], content: bytes, filename: str = "a.png"):
    """A multipart/form-data body: the policy's fields, then the file (S3 wants it last)."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        .encode()
        for name, value in fields.items()
    ]  # fmt: skip
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_form(url: str, fields: dict[str, str], content: bytes) -> tuple[int, bytes]:
    body, content_type = multipart(fields, content)
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def upload_key(s3_env: dict[str, str], s3_client) -> Iterator[str]:
    """A key of this test's own in the session store; deleted afterwards."""
    key = f"test-embedded-s3/{uuid.uuid4().hex}/a.png"
    yield key
    s3_client.delete_object(Bucket=s3_env["SWITCHBOARD_S3_BUCKET"], Key=key)


def presigned_post(s3_env, s3_client, key: str, *, expires: int = 60) -> dict:
    return s3_client.generate_presigned_post(
        Bucket=s3_env["SWITCHBOARD_S3_BUCKET"],
        Key=key,
        Fields={"Content-Type": "image/png"},
        Conditions=[{"Content-Type": "image/png"}, ["content-length-range", 1, LIMIT]],
        ExpiresIn=expires,
    )


def stored(s3_env, s3_client, key: str) -> bool:
    found = s3_client.list_objects_v2(Bucket=s3_env["SWITCHBOARD_S3_BUCKET"], Prefix=key)
    return found.get("KeyCount", 0) > 0


def test_an_upload_within_the_policy_is_stored(s3_env, s3_client, upload_key):
    post = presigned_post(s3_env, s3_client, upload_key)
    status, body = post_form(post["url"], post["fields"], PNG)
    assert status in (200, 201, 204), body
    stored_object = s3_client.get_object(Bucket=s3_env["SWITCHBOARD_S3_BUCKET"], Key=upload_key)
    assert stored_object["Body"].read() == PNG
    assert stored_object["ContentType"] == "image/png"


def test_a_wrong_content_type_is_refused(s3_env, s3_client, upload_key):
    post = presigned_post(s3_env, s3_client, upload_key)
    status, body = post_form(post["url"], {**post["fields"], "Content-Type": "text/html"}, PNG)
    assert status == 403, body
    assert b"AccessDenied" in body
    assert not stored(s3_env, s3_client, upload_key)


def test_a_file_over_the_length_range_is_refused(s3_env, s3_client, upload_key):
    post = presigned_post(s3_env, s3_client, upload_key)
    status, body = post_form(post["url"], post["fields"], PNG + b"\x00" * LIMIT)
    assert status == 400, body
    assert b"EntityTooLarge" in body
    assert not stored(s3_env, s3_client, upload_key)


def test_an_empty_file_is_refused(s3_env, s3_client, upload_key):
    post = presigned_post(s3_env, s3_client, upload_key)
    status, body = post_form(post["url"], post["fields"], b"")
    assert status == 400, body
    assert b"EntityTooSmall" in body
    assert not stored(s3_env, s3_client, upload_key)


def test_an_expired_policy_is_refused(s3_env, s3_client, upload_key):
    post = presigned_post(s3_env, s3_client, upload_key, expires=-60)
    status, body = post_form(post["url"], post["fields"], PNG)
    assert status == 403, body
    assert b"AccessDenied" in body
    assert b"expired" in body
    assert not stored(s3_env, s3_client, upload_key)


def test_a_policy_does_not_upload_to_another_key(s3_env, s3_client, upload_key):
    post = presigned_post(s3_env, s3_client, upload_key)
    other = upload_key.replace("a.png", "other.png")
    status, body = post_form(post["url"], {**post["fields"], "key": other}, PNG)
    assert status == 403, body
    assert b"AccessDenied" in body
    assert not stored(s3_env, s3_client, other)
    assert not stored(s3_env, s3_client, upload_key)


def test_the_bucket_refuses_anonymous_reads(s3_env, s3_client, upload_key):
    bucket = s3_env["SWITCHBOARD_S3_BUCKET"]
    s3_client.put_object(Bucket=bucket, Key=upload_key, Body=PNG, ContentType="image/png")
    endpoint = s3_env.get("SWITCHBOARD_S3_ENDPOINT_URL")
    if endpoint:
        object_url, bucket_url = f"{endpoint}/{bucket}/{upload_key}", f"{endpoint}/{bucket}/"
    else:
        object_url = f"https://{bucket}.s3.amazonaws.com/{upload_key}"
        bucket_url = f"https://{bucket}.s3.amazonaws.com/"
    assert get(object_url)[0] == 403
    assert get(bucket_url)[0] == 403
    # While a signed URL reads it.
    signed = s3_client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": upload_key}, ExpiresIn=60
    )
    assert get(signed) == (200, PNG)


def test_an_embedded_server_keeps_its_data_keys_and_ports_across_a_restart(tmp_path: Path):
    server = SeaweedServer(tmp_path / "s3", bucket="restart-check")
    assert set(server.ports) == set(SEAWEED_PORTS)
    assert len(set(server.ports.values())) == len(SEAWEED_PORTS)
    env = server.env()
    assert env == {
        "SWITCHBOARD_S3_BUCKET": "restart-check",
        "SWITCHBOARD_S3_ENDPOINT_URL": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_REGION": "us-east-1",
    }
    try:
        server.start()
        client = server.client()
        client.put_object(Bucket="restart-check", Key="kept", Body=b"still here")
        client.close()
        assert get(server.endpoint_url + "/restart-check/kept")[0] == 403
    finally:
        server.stop()
    assert all(port_is_free(port) for port in server.ports.values())

    again = SeaweedServer(
        tmp_path / "s3",
        bucket="restart-check",
        access_key=server.access_key,
        secret_key=server.secret_key,
        ports=server.ports,
    )
    assert again.ports == server.ports
    try:
        again.start()
        # start() waits for this: before it, old objects read as InternalError.
        assert again._volume_server_registered()
        client = again.client()
        kept = client.get_object(Bucket="restart-check", Key="kept")["Body"].read()
        client.close()
        assert kept == b"still here"
    finally:
        again.stop()
    assert all(port_is_free(port) for port in again.ports.values())
    assert not list(Path("/tmp").glob(f"seaweedfs-*-{again.ports['s3.port']}.sock"))


def test_a_server_that_cannot_start_says_where_its_log_is(tmp_path: Path):
    # The S3 port already taken: weed cannot listen there.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        server = SeaweedServer(tmp_path / "s3", ports={"s3.port": taken})
        with pytest.raises(EmbeddedServerError, match=r"weed\.log"):
            server.start(timeout=20)
    assert server.process is not None and server.process.poll() is not None
