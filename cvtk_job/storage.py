"""Local paths and `s3://bucket/key` URIs. The only module that imports boto3.

Transport only (COCO staging lives in `coco`, done markers in `artifacts`). Inputs are staged in to a
local cache that mirrors the bucket's layout (so relative `file_name`s in a staged COCO JSON resolve to
the staged images): objects named by a file are fetched one request each, conditional on the cached
ETag; a prefix is listed once and only what the listing holds is used, skipping unchanged objects.
Every transfer of one call shares one retry deadline, and the first failure stops the others.
Outputs are written locally and uploaded: S3 makes an object visible only once it is complete.
Credentials and endpoint come from boto3's standard chain (environment, profile, web identity,
instance role; `AWS_ENDPOINT_URL(_S3)`); nothing here ever prints them.
"""

import concurrent.futures
import contextlib
import json
import logging
import os
import posixpath
import sys
import threading
import time

from . import names
from .errors import StorageError, UserError

log = logging.getLogger(__name__)
PARALLEL = int(os.environ.get("CVTK_JOB_S3_PARALLEL", "16"))
# Below this, one GET is cheaper than s3transfer's multipart machinery (threads per file).
SMALL_OBJECT_BYTES = 8 * 2**20
# An object named by a COCO file is checked against S3 (a conditional GET) at every staging, except when it
# was checked this recently: the other processes of a job on one node stage right after the first one.
FRESH_SECONDS = float(os.environ.get("CVTK_JOB_S3_FRESH_SECONDS", "60"))
# Bounded retries: a restarting server (seconds) is waited out; an unreachable endpoint fails within
# about RETRY_SECONDS instead of hanging. botocore retries quickly inside each of our attempts.
RETRY_SECONDS = float(os.environ.get("CVTK_JOB_S3_RETRY_SECONDS", "45"))
BOTO_ATTEMPTS, CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 2, 5, 30
USER_ERROR_CODES = {
    "NoSuchBucket": "no such bucket", "NoSuchKey": "no such object", "404": "no such object",
    "NotFound": "no such object", "AccessDenied": "access denied",
    "403": "access denied: wrong keys or no permission",  # HEAD responses carry no error code
    "InvalidAccessKeyId": "the access key is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "InvalidBucketName": "invalid bucket name", "AllAccessDisabled": "access denied",
}
CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the pod's role"


def is_s3(uri):
    return isinstance(uri, str) and uri.startswith("s3://")


def split(uri):
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise UserError(f"{uri}: an S3 URI looks like s3://bucket/key")
    return bucket, key


def join(uri, *parts):
    return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)


def cache_root():
    return os.environ.get("CVTK_JOB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cvtk-job")


@contextlib.contextmanager
def node_lock():
    """One stager at a time on a machine. The processes of one job on a node (torchrun's workers, srun's
    tasks) share this cache: the first stages data and checkpoints, the others then find every object
    cached and unchanged, so nothing is fetched twice and no two processes replace the same file."""
    import fcntl

    os.makedirs(cache_root(), exist_ok=True)
    with open(os.path.join(cache_root(), ".stage.lock"), "a", encoding="ascii") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mirror(area, uri):
    bucket, key = split(uri)
    problem = names.key_problem(key)
    if problem:
        raise UserError(f"{uri}: {problem}; rename the object (or the prefix) without '..'")
    return os.path.join(cache_root(), area, bucket, *key.split("/"))


def cache_path(uri):
    """Where an object is cached locally: <cache>/s3/<bucket>/<key> (mirrors the bucket)."""
    return _mirror("s3", uri)


def staging_path(uri):
    """Where outputs bound for `uri` are written before they are uploaded."""
    return _mirror("outputs", uri)


# ---------------------------------------------------------------------------------------------
# The client and its errors


_client_lock = threading.Lock()
_client = None


def client():
    global _client
    with _client_lock:
        if _client is None:
            import boto3
            from botocore.config import Config

            _client = boto3.session.Session().client("s3", config=Config(
                retries={"total_max_attempts": BOTO_ATTEMPTS, "mode": "standard"},
                connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                max_pool_connections=PARALLEL + 4))
        return _client


def translate(err, uri):
    """A boto3/botocore exception → UserError (exit 2) or StorageError (exit 3), naming the object."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return UserError(f"{uri}: no S3 credentials found; {CREDENTIALS_HINT}")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in USER_ERROR_CODES:
            hint = CREDENTIALS_HINT if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                                                "403") else "check the bucket and key"
            return UserError(f"{uri}: {USER_ERROR_CODES[code]} ({code}); {hint}")
        return StorageError(f"{uri}: S3 error {code or status}, still failing after {RETRY_SECONDS:.0f} s of retries; "
                            "retry later")
    if isinstance(err, S3UploadFailedError):
        text = str(err)
        for code, what in USER_ERROR_CODES.items():
            if f"({code})" in text:
                return UserError(f"{uri}: {what} ({code}); {CREDENTIALS_HINT}")
        return StorageError(f"{uri}: upload failed after retries ({text.splitlines()[0][:200]}); retry later")
    if isinstance(err, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint {err.kwargs.get('endpoint_url', '')} for "
                            f"{RETRY_SECONDS:.0f} s; check AWS_ENDPOINT_URL_S3 and the network, then retry")
    if isinstance(err, BotoCoreError):
        return StorageError(f"{uri}: S3 request failed ({type(err).__name__}); retry later")
    return None


class Budget:
    """One retry deadline and one cancellation shared by every transfer of a call (a staging, a sync): when the
    server is gone, 10,000 queued objects fail together within RETRY_SECONDS, not each after its own budget."""

    def __init__(self, seconds=None):
        self.start = time.monotonic()
        self.deadline = self.start + (RETRY_SECONDS if seconds is None else seconds)
        self.failed = threading.Event()

    def elapsed(self):
        return time.monotonic() - self.start


def _call(uri, fn, *args, _budget=None, **kwargs):
    """Run an S3 operation; retry storage failures with backoff until the budget's deadline (RETRY_SECONDS
    from now without one), and not at all once another transfer of the same budget has failed."""
    budget = _budget or Budget()
    delay = 0.5
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            mapped = translate(err, uri)
            if mapped is None:
                raise
            # Keep trying until the whole budget is spent (the last wait is cut short to end on it), so the
            # error's "for N s" is true and a brief outage near the end of the budget still gets one more try.
            remaining = budget.deadline - time.monotonic()
            if isinstance(mapped, UserError) or remaining <= 0 or budget.failed.is_set():
                raise mapped from None
            wait = min(delay, remaining)
            log.warning("%s: %s; retrying in %.1f s", uri, type(err).__name__, wait)
            if budget.failed.wait(wait):
                raise mapped from None
            delay = min(delay * 2, 8.0)


def _parallel(jobs, what, on_done=None):
    """Run `jobs` ({key: fn(budget)}) on PARALLEL threads with one Budget; the first failure cancels the queued
    jobs and stops the running ones' retries, and is raised naming its object and the time spent."""
    budget = Budget()
    pool = concurrent.futures.ThreadPoolExecutor(PARALLEL)
    try:
        futures = {pool.submit(fn, budget): key for key, fn in jobs.items()}
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except BaseException as err:
                budget.failed.set()
                pool.shutdown(wait=True, cancel_futures=True)
                if isinstance(err, StorageError):
                    raise StorageError(f"{err} ({what}: stopped after {budget.elapsed():.0f} s, "
                                       f"{sum(f.done() and not f.cancelled() for f in futures)} of {len(futures)} "
                                       "finished)") from None
                raise
            if on_done:
                on_done(futures[future])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def head(uri):
    bucket, key = split(uri)
    meta = _call(uri, client().head_object, Bucket=bucket, Key=key)
    return meta["ContentLength"], meta["ETag"]


def exists(uri):
    try:
        head(uri)
        return True
    except UserError as err:
        if "no such object" in str(err):
            return False
        raise


def remove(uri):
    """Delete an object; deleting one that is not there is not an error (S3's own semantics)."""
    bucket, key = split(uri)
    _call(uri, client().delete_object, Bucket=bucket, Key=key)


def list_objects(prefix_uri):
    """{uri: (size, etag)} of every object under a prefix."""
    bucket, prefix = split(prefix_uri)
    found = {}
    paginator = client().get_paginator("list_objects_v2")

    def pages():
        return list(paginator.paginate(Bucket=bucket, Prefix=prefix))

    for page in _call(prefix_uri, pages):
        for obj in page.get("Contents", []):
            found[f"s3://{bucket}/{obj['Key']}"] = (obj["Size"], obj["ETag"])
    return found


# ---------------------------------------------------------------------------------------------
# Stage in


def _meta_path(local):
    return os.path.join(os.path.dirname(local), ".cvtk-s3", os.path.basename(local) + ".json")


def _cached(local, size, etag):
    try:
        with open(_meta_path(local)) as fh:
            meta = json.load(fh)
        return meta.get("size") == size and meta.get("etag") == etag and os.path.getsize(local) == size
    except (OSError, ValueError):
        return False


def _get_small(bucket, key, path):
    body = client().get_object(Bucket=bucket, Key=key)["Body"]
    with open(path, "wb") as fh:
        for chunk in body.iter_chunks(1 << 20):
            fh.write(chunk)


def _download(uri, local, size, etag, budget=None):
    bucket, key = split(uri)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        if size < SMALL_OBJECT_BYTES:
            _call(uri, _get_small, bucket, key, tmp, _budget=budget)
        else:
            _call(uri, client().download_file, bucket, key, tmp, _budget=budget)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    os.makedirs(os.path.dirname(_meta_path(local)), exist_ok=True)
    with open(_meta_path(local), "w") as fh:
        json.dump({"size": size, "etag": etag}, fh)


def stage_objects(objects, what="files"):
    """Download {uri: (size, etag)} into the cache in parallel, skipping unchanged ones; {uri: local}."""
    local = {uri: cache_path(uri) for uri in objects}
    todo = [uri for uri in objects if not _cached(local[uri], *objects[uri])]
    if todo:
        total = sum(objects[u][0] for u in todo)
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, desc=f"staging {len(todo)} {what}",
                  disable=None) as bar:
            jobs = {uri: (lambda budget, uri=uri: _download(uri, local[uri], *objects[uri], budget)) for uri in todo}
            _parallel(jobs, f"staging {len(todo)} {what}", on_done=lambda uri: bar.update(objects[uri][0]))
    log.info("staged %d %s (%d downloaded, %d unchanged in the cache)", len(objects), what, len(todo),
             len(objects) - len(todo))
    return local


def stage_file(uri):
    """A local path stays as it is; an s3:// object is cached locally (once) and its path returned."""
    if not is_s3(uri):
        return uri
    cache_path(uri)  # a key that cannot be mirrored is refused before any request
    return stage_objects({uri: head(uri)}, what="file")[uri]


def stage_optional(uri):
    """Like stage_file, but None when the object does not exist."""
    if not is_s3(uri):
        return uri if os.path.exists(uri) else None
    return stage_file(uri) if exists(uri) else None


def safe_relative(name, where):
    """A file name inside a prefix (names.name_problem: no absolute names, no `..`)."""
    problem = names.name_problem(name, local=False)
    if problem:
        raise UserError(f"{where}: {problem[0]}; {problem[1]}")
    return posixpath.normpath(name)


class _Missing(Exception):
    pass


def _fetch_named(uri, local, budget):
    """GET one object into the cache, conditional on the cached copy's ETag (304: keep it): one request per
    object, whatever the cache holds, and the cache is checked against S3 every time."""
    from botocore.exceptions import ClientError

    bucket, key = split(uri)
    meta = None
    try:
        with open(_meta_path(local)) as fh:
            meta = json.load(fh)
        if os.path.getsize(local) != meta.get("size"):
            meta = None
    except (OSError, ValueError, AttributeError):
        meta = None
    if meta and time.time() - meta.get("checked", 0) < FRESH_SECONDS:
        return False  # checked moments ago, by the process of this job that staged first on this node

    def remember(size, etag):
        os.makedirs(os.path.dirname(_meta_path(local)), exist_ok=True)
        with open(_meta_path(local), "w") as fh:
            json.dump({"size": size, "etag": etag, "checked": time.time()}, fh)

    def get():
        try:
            reply = client().get_object(Bucket=bucket, Key=key, **({"IfNoneMatch": meta["etag"]} if meta else {}))
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = err.response.get("Error", {}).get("Code")
            if status == 304 or code in ("304", "NotModified"):
                remember(meta["size"], meta["etag"])
                return False
            if status == 404 or code in ("NoSuchKey", "404"):
                raise _Missing(uri) from None
            raise
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.part-{os.getpid()}-{threading.get_ident()}"
        try:
            with open(tmp, "wb") as fh:
                for chunk in reply["Body"].iter_chunks(1 << 20):
                    fh.write(chunk)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        remember(reply["ContentLength"], reply["ETag"])
        return True

    return _call(uri, get, _budget=budget)


def stage_many(base_uri, names, where):
    """Stage base_uri/<name> for every name: exactly those objects, one request each (no listing of the folder,
    which for a JSON at the bucket root is the whole bucket); {uri: local path}."""
    uris = sorted({join(base_uri, safe_relative(n, where)) for n in names})
    local = {uri: cache_path(uri) for uri in uris}
    missing, fetched = [], []

    def job(uri):
        def run(budget):
            try:
                if _fetch_named(uri, local[uri], budget):
                    fetched.append(uri)
            except _Missing:
                missing.append(uri)
        return run

    _parallel({uri: job(uri) for uri in uris}, f"staging {len(uris)} images")
    if missing:
        raise UserError(f"{where}: {len(missing)} referenced file(s) not on S3, e.g. {sorted(missing)[0]}; upload "
                        "them or fix the file names")
    log.info("staged %d images (%d downloaded, %d unchanged in the cache)", len(uris), len(fetched),
             len(uris) - len(fetched))
    return local


def stage_prefix(prefix_uri, keep):
    """Stage every object under a prefix whose name passes `keep`; returns {key relative to the prefix: local
    path}, exactly the objects listed now (an object deleted from S3 but still in the cache is not in it)."""
    prefix_uri = prefix_uri.rstrip("/") + "/"
    objects = {u: m for u, m in list_objects(prefix_uri).items() if keep(u)}
    if not objects:
        raise UserError(f"{prefix_uri}: no images under this prefix")
    local = stage_objects(objects, what="images")
    return {uri[len(prefix_uri):]: local[uri] for uri in sorted(local)}


# ---------------------------------------------------------------------------------------------
# Sync out


class Outbox:
    """Uploads files from a local folder to an S3 prefix; only what changed since the last sync."""

    def __init__(self, local_root, remote_root):
        self.local_root, self.remote_root = local_root, remote_root.rstrip("/")
        self._sent = {}

    def _remote(self, path):
        rel = os.path.relpath(path, self.local_root).replace(os.sep, "/")
        return f"{self.remote_root}/{rel}"

    def _upload(self, path, uri, budget=None):
        bucket, key = split(uri)
        _call(uri, client().upload_file, path, bucket, key, _budget=budget)

    def sync(self, paths):
        """Upload the given files (those that changed since their last upload), in parallel."""
        todo = []
        for path in paths:
            if not os.path.isfile(path):
                continue
            stamp = (os.path.getsize(path), os.path.getmtime(path))
            if self._sent.get(path) != stamp:
                todo.append((path, stamp))
        _parallel({path: (lambda budget, path=path: self._upload(path, self._remote(path), budget))
                   for path, _ in todo}, f"uploading {len(todo)} files")
        for path, stamp in todo:
            self._sent[path] = stamp
        return [self._remote(p) for p, _ in todo]

    def sync_tree(self, folder):
        paths = [os.path.join(parent, f) for parent, _, files in os.walk(folder) for f in files
                 if not f.startswith(".") and ".part-" not in f]
        return self.sync(paths)
