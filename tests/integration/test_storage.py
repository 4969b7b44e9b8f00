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
    from cvtk_job import transfer

    storage, proxy, bucket = store
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(transfer.LARGE_PART_BYTES * 2 + 12345))
    outbox = storage.Outbox(str(tmp_path), f"s3://{bucket}/up")
    outbox.sync([str(big)])
    uploads = [q for m, p, q in proxy.queries if m == "PUT" and p == f"/{bucket}/up/big.bin" and "partNumber" in q]
    assert len(uploads) >= 2  # a multipart upload
    local = storage.stage_file(f"s3://{bucket}/up/big.bin")
    assert hashlib.sha256(open(local, "rb").read()).digest() == hashlib.sha256(big.read_bytes()).digest()


def test_the_cache_keeps_two_endpoints_apart(s3_server, store, tmp_path):
    """The same bucket and key behind two endpoints are two objects: each gets its own cache folder."""
    storage, proxy, bucket = store
    s3_server.client().put_object(Bucket=bucket, Key="a/x.jpg", Body=b"through the proxy")
    via_proxy = storage.stage_file(f"s3://{bucket}/a/x.jpg")
    storage._client = None
    os.environ["AWS_ENDPOINT_URL_S3"] = s3_server.endpoint  # restored by the fixture's monkeypatch
    direct = storage.stage_file(f"s3://{bucket}/a/x.jpg")
    assert via_proxy != direct
    assert proxy.endpoint.split("//")[1].replace(":", "_") in via_proxy
    assert s3_server.endpoint.split("//")[1].replace(":", "_") in direct
    assert open(direct, "rb").read() == open(via_proxy, "rb").read() == b"through the proxy"


def test_a_missing_named_object_is_one_error_and_the_others_are_fetched_once(s3_server, store):
    from cvtk_job.errors import UserError

    storage, proxy, bucket = store
    client = s3_server.client()
    for i in range(40):
        client.put_object(Bucket=bucket, Key=f"n/{i:02d}.jpg", Body=b"%d" % i)
    with pytest.raises(UserError, match=rf"1 referenced file\(s\) not on S3, e\.g\. s3://{bucket}/n/99\.jpg"):
        storage.stage_many(f"s3://{bucket}/n", [f"{i:02d}.jpg" for i in [*range(40), 99]], "list.txt")
    gets = proxy.gets(f"/{bucket}/n/")
    assert gets == {f"/{bucket}/n/{i:02d}.jpg": 1 for i in [*range(40), 99]}  # one GET each, no listing
    assert proxy.listings() == []


def test_a_local_cache_failure_mid_call_cancels_the_rest_and_names_the_folder(s3_server, store, tmp_path):
    """One object's cache folder cannot be made (a file is in the way) while hundreds of others are in flight:
    one StorageError naming the object and the folder, the others cancelled (no part files left behind)."""
    from cvtk_job.errors import StorageError

    storage, proxy, bucket = store
    client = s3_server.client()
    keys = [f"ok/{i:03d}.jpg" for i in range(300)]
    keys.insert(100, "blocked/x.jpg")
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    listing = storage.list_objects(f"s3://{bucket}/")
    blocked = os.path.dirname(storage.cache_path(f"s3://{bucket}/blocked/x.jpg"))
    os.makedirs(os.path.dirname(blocked), exist_ok=True)
    open(blocked, "w").close()
    with pytest.raises(StorageError, match=rf"s3://{bucket}/blocked/x\.jpg: cannot create .*blocked in the local"):
        storage.stage_objects({uri: listing[uri] for uri in (f"s3://{bucket}/{k}" for k in keys)})
    assert list((tmp_path / "cache").rglob("*.part-*")) == []


def test_long_transfers_log_progress_with_files_bytes_and_time_left(s3_server, store, monkeypatch, caplog):
    import logging

    from cvtk_job import transfer

    storage, proxy, bucket = store
    client = s3_server.client()
    for i in range(300):
        client.put_object(Bucket=bucket, Key=f"p/{i:03d}.jpg", Body=b"x" * 10_000)
    monkeypatch.setattr(transfer, "PROGRESS_SECONDS", 0.0)  # a line at every turn of the loop
    monkeypatch.setattr(transfer, "WINDOW", 8)  # many turns
    with caplog.at_level(logging.INFO, logger="cvtk_job.storage"):
        storage.stage_prefix(f"s3://{bucket}/p/", keep=lambda uri: True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("staging 300 images: ")]
    assert len(lines) >= 2, [r.getMessage() for r in caplog.records]
    import re

    counts = [re.fullmatch(r"staging 300 images: ([\d,]+) of 300 files, ([\d,]+) of 3 MiB, [\d.,]+ MiB/s"
                           r"(, about [\d,]+ s left)?", line) for line in lines]
    assert all(counts), lines
    files = [int(m.group(1).replace(",", "")) for m in counts]
    assert files == sorted(files) and files[-1] <= 300
