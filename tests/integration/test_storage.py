"""storage against the real S3 server, in-process: pagination past 1,000 keys and multipart transfers, asserted
by what reached the server (tests/s3proxy.py), not by what the client believes."""

import hashlib
import os
import uuid

import pytest

from tests.s3proxy import CountingProxy

pytestmark = pytest.mark.slow


@pytest.fixture
def store(s3_server, tmp_path, monkeypatch):
    """cvtk_job.storage pointed at the server through a counting proxy, with a fresh cache and client."""
    from cvtk_job import storage

    with CountingProxy(s3_server.endpoint) as proxy:
        for key, value in {**s3_server.env(), "AWS_ENDPOINT_URL_S3": proxy.endpoint,
                           "CVTK_JOB_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(storage, "_client", None)
        bucket = f"store-{uuid.uuid4().hex[:8]}"
        s3_server.client().create_bucket(Bucket=bucket)
        yield storage, proxy, bucket
        monkeypatch.setattr(storage, "_client", None)


def test_a_prefix_of_more_than_1000_objects_is_listed_completely(s3_server, store):
    import concurrent.futures

    storage, proxy, bucket = store
    client = s3_server.client()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket=bucket, Key=f"p/{i:04d}.jpg", Body=b"%d" % i), range(1234)))
    staged = storage.stage_prefix(f"s3://{bucket}/p/", keep=lambda uri: uri.endswith(".jpg"))
    assert sorted(staged) == [f"{i:04d}.jpg" for i in range(1234)]
    assert all(open(path, "rb").read() == b"%d" % i for i, (_, path) in enumerate(sorted(staged.items())))
    assert len(proxy.listings()) == 2  # 1,000 + 234: two pages, each asked for once
    again = len(proxy.requests)
    storage.stage_prefix(f"s3://{bucket}/p/", keep=lambda uri: uri.endswith(".jpg"))
    assert [m for m, _ in proxy.requests[again:]] == ["GET", "GET"]  # the two listing pages; no object fetched


def test_an_object_above_the_multipart_threshold_goes_both_ways_intact(s3_server, store, tmp_path):
    storage, proxy, bucket = store
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(storage.SMALL_OBJECT_BYTES * 2 + 12345))
    outbox = storage.Outbox(str(tmp_path), f"s3://{bucket}/up")
    outbox.sync([str(big)])
    uploads = [q for m, p, q in proxy.queries if m == "PUT" and p == f"/{bucket}/up/big.bin" and "partNumber" in q]
    assert len(uploads) >= 2  # a multipart upload
    local = storage.stage_file(f"s3://{bucket}/up/big.bin")
    assert hashlib.sha256(open(local, "rb").read()).digest() == hashlib.sha256(big.read_bytes()).digest()
