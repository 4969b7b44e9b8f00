"""Local paths and `s3://bucket/key` URIs. The only module that imports boto3.

Transport only (COCO staging lives in `coco`, done markers in `artifacts`). Inputs are staged in to a
local cache that mirrors the endpoint's buckets (so relative `file_name`s in a staged COCO JSON resolve to
the staged images): objects named by a file are fetched one request each, conditional on the cached
ETag; a prefix is listed once and only what the listing holds is used, skipping unchanged objects.
Object data moves through `transfer.Engine` (one CRT client, one deadline per call, the first failure
stops the others); boto3 lists, HEADs and deletes. Outputs are written locally and uploaded: S3 makes
an object visible only once it is complete. Credentials and endpoint come from boto3's standard chain
(environment, profile, web identity, instance role; `AWS_ENDPOINT_URL(_S3)`); nothing here prints them.
"""

import contextlib
import json
import logging
import os
import posixpath
import threading
import time
import urllib.parse

from . import names
from .errors import StorageError, UserError

log = logging.getLogger(__name__)
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
    return os.path.join(cache_root(), area, endpoint_name(), bucket, *key.split("/"))


def cache_path(uri):
    """Where an object is cached locally: <cache>/s3/<endpoint>/<bucket>/<key> (mirrors the bucket)."""
    return _mirror("s3", uri)


def staging_path(uri):
    """Where outputs bound for `uri` are written before they are uploaded."""
    return _mirror("outputs", uri)


# ---------------------------------------------------------------------------------------------
# The client and its errors


_client_lock = threading.Lock()
_client = None  # (boto3 client, its session's credentials, the transfer engine made from them, or None)


@contextlib.contextmanager
def _long_lived():
    """For what lives as long as the process: boto3's modules and the client's service models, ~95,000 objects.
    Made with the cyclic collector paused, then frozen out of it (gc.freeze), so that neither the collections
    while they are made nor any later one (nor the one at exit) scans them again. Measured on a process that
    stages 1,000 small images (the S3 staging benchmark), two sets of 8 alternated runs: 0.87 -> 0.76 s and
    1.07 -> 0.91 s; the exit alone 100 -> 25 ms. When the caller has paused the collector itself (train's
    start-up), it is left to the caller."""
    import gc

    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _clients():
    global _client
    with _client_lock:
        if _client is None:
            with _long_lived():
                import boto3
                import botocore.session
                from botocore.config import Config

                core = botocore.session.get_session()
                # Timestamps stay text: nothing here reads them, and parsing LastModified with dateutil is a third
                # of the client time of listing 10,000 objects.
                core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
                session = boto3.session.Session(botocore_session=core)
                boto = session.client("s3", config=Config(
                    retries={"total_max_attempts": BOTO_ATTEMPTS, "mode": "standard"},
                    connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S))
                _client = [boto, session.get_credentials(), None]
        return _client


def client():
    """boto3's S3 client: listings, HEADs, deletes (object data goes through `engine()`)."""
    return _clients()[0]


def engine():
    """The process's transfer engine (cvtk_job.transfer), on the same endpoint and credentials as `client()`."""
    from . import transfer

    clients = _clients()
    with _client_lock:
        if clients[2] is None:
            clients[2] = transfer.Engine(clients[0], clients[1])
        return clients[2]


def endpoint_name():
    """The endpoint as a folder name (host and port): the cache keeps two servers' same-named buckets apart."""
    netloc = urllib.parse.urlsplit(client().meta.endpoint_url).netloc
    return netloc.replace(":", "_").replace("@", "_") or "default"


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


def _call(uri, fn, *args, **kwargs):
    """Run one S3 metadata operation (list, head, delete); retry storage failures with backoff for RETRY_SECONDS."""
    deadline = time.monotonic() + RETRY_SECONDS
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
            remaining = deadline - time.monotonic()
            if isinstance(mapped, UserError) or remaining <= 0:
                raise mapped from None
            wait = min(delay, remaining)
            log.warning("%s: %s; retrying in %.1f s", uri, type(err).__name__, wait)
            time.sleep(wait)
            delay = min(delay * 2, 8.0)


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


# The cache's record of what each file is (size, ETag, when it was last checked against S3): one small JSON per
# cache folder, written after the files it describes are in place, so a record is never newer than its file.
INDEX = ".cvtk-s3.json"


class _Index:
    """The records of the cache folders one staging touches, loaded once per folder and saved once at the end
    (one file per folder instead of one per object: 10,000 records are one write, not 10,000)."""

    def __init__(self):
        self._folders, self._dirty = {}, set()

    def _folder(self, folder):
        if folder not in self._folders:
            try:
                with open(os.path.join(folder, INDEX), encoding="utf-8") as fh:
                    records = json.load(fh)
                self._folders[folder] = records if isinstance(records, dict) else {}
            except (OSError, ValueError):
                self._folders[folder] = {}
        return self._folders[folder]

    def get(self, local):
        """The record of a cached file, or None when there is none or the file no longer matches its size."""
        record = self._folder(os.path.dirname(local)).get(os.path.basename(local))
        try:
            if isinstance(record, dict) and os.path.getsize(local) == record.get("size"):
                return record
        except OSError:
            pass
        return None

    def put(self, local, size, etag):
        folder = os.path.dirname(local)
        self._folder(folder)[os.path.basename(local)] = {"size": size, "etag": etag, "checked": time.time()}
        self._dirty.add(folder)

    def save(self):
        for folder in self._dirty:
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f"{INDEX}.part-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self._folders[folder], fh, separators=(",", ":"))
            os.replace(tmp, os.path.join(folder, INDEX))
        self._dirty.clear()


def _transfer(items, what, index=None, total_bytes=None):
    """Run items on the engine; the index records every object fetched, also when the call fails half-way."""
    from . import transfer

    def on_item(item):
        if index is not None and item.op == transfer.GET:
            if item.result == "done":
                index.put(item.path, item.size, item.etag)
            elif item.result == "unchanged":
                index.put(item.path, *(lambda r: (r["size"], r["etag"]))(index.get(item.path)))

    try:
        engine().run(items, what, RETRY_SECONDS, on_item=on_item, total_bytes=total_bytes)
    finally:
        if index is not None:
            index.save()


def stage_objects(objects, what="files"):
    """Download {uri: (size, etag)} (a listing) into the cache, skipping files whose record matches; {uri: local}."""
    from . import transfer

    local = {uri: cache_path(uri) for uri in objects}
    index = _Index()
    todo = [uri for uri in objects if (lambda r, m: not r or (r["size"], r["etag"]) != m)(index.get(local[uri]),
                                                                                           tuple(objects[uri]))]
    if todo:
        _transfer([transfer.Item(transfer.GET, uri, local[uri], size=objects[uri][0], etag=objects[uri][1])
                   for uri in todo], f"staging {len(todo)} {what}",
                  index, total_bytes=sum(objects[u][0] for u in todo))
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


def stage_many(base_uri, names, where):
    """Stage base_uri/<name> for every name: exactly those objects, one GET each, conditional on the cached copy's
    ETag (304: keep it), so the cache is checked against S3 every time without listing the folder (for a JSON at
    the bucket root, the whole bucket). An object checked within FRESH_SECONDS is not asked again: the other
    processes of a job on one node stage right after the first. {uri: local path}."""
    from . import transfer

    uris = sorted({join(base_uri, safe_relative(n, where)) for n in names})
    local = {uri: cache_path(uri) for uri in uris}
    index, items = _Index(), []
    for uri in uris:
        record = index.get(local[uri])
        if record and time.time() - record.get("checked", 0) < FRESH_SECONDS:
            continue
        items.append(transfer.Item(transfer.GET, uri, local[uri], if_none_match=record and record.get("etag")))
    _transfer(items, f"staging {len(uris)} images", index)
    missing = [item.uri for item in items if item.result == "missing"]
    if missing:
        raise UserError(f"{where}: {len(missing)} referenced file(s) not on S3, e.g. {sorted(missing)[0]}; upload "
                        "them or fix the file names")
    fetched = sum(item.result == "done" for item in items)
    log.info("staged %d images (%d downloaded, %d unchanged in the cache)", len(uris), fetched, len(uris) - fetched)
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

    def sync(self, paths):
        """Upload the given files (those that changed since their last upload), in parallel, on the engine."""
        from . import transfer

        todo = []
        for path in paths:
            if not os.path.isfile(path):
                continue
            stamp = (os.path.getsize(path), os.path.getmtime(path))
            if self._sent.get(path) != stamp:
                todo.append((path, stamp))
        if todo:
            _transfer([transfer.Item(transfer.PUT, self._remote(p), p) for p, _ in todo],
                      f"uploading {len(todo)} files", total_bytes=sum(stamp[0] for _, stamp in todo))
        for path, stamp in todo:
            self._sent[path] = stamp
        return [self._remote(p) for p, _ in todo]

    def sync_tree(self, folder):
        paths = [os.path.join(parent, f) for parent, _, files in os.walk(folder) for f in files
                 if not f.startswith(".") and ".part-" not in f]
        return self.sync(paths)
