"""The transfer engine: every GET and PUT of object data goes through one awscrt S3 client (the C engine
boto3 ships as its `crt` extra). boto3 stays for listings, HEADs and deletes (`storage`).

Why not boto3 for the data: boto3 spends ~2-5 ms of Python per request, so 10,000 small images take
tens of seconds of CPU; the CRT signs, sends and writes in C on its own event loop and calls back into
Python once per object (measured in bench/: staging 1,000 small images 4x faster). It also gives one
connection pool and one retry policy for every transfer of the process, and splits large objects into
parallel ranged GETs / multipart uploads itself.

One call (`run`) = one Budget: retries of failed transfers wait with backoff while the call makes
progress; the call fails once nothing has progressed for RETRY_SECONDS, or at the first failure that
retrying cannot fix (a missing object, wrong keys). Either way every transfer still in flight is
cancelled, and the error names the first failing object, the time spent and how many finished.
"""

import collections
import heapq
import logging
import os
import re
import threading
import time
import urllib.parse

from .errors import StorageError, UserError

# How many transfers are in flight at once (the CRT paces them on its connections; s5cmd runs 256 workers
# by default). Bounds open files and the load put on the server.
WINDOW = int(os.environ.get("CVTK_JOB_S3_PARALLEL", "256"))
# Objects at least this big are split by the CRT into parts transferred in parallel.
PART_BYTES = 8 * 2**20
# ... and such a large object moves in LARGE_PART_BYTES parts over at most LARGE_CONNECTIONS connections. The CRT
# sizes its connections and buffers for throughput_target_gbps (right for thousands of small objects at once), but
# one big object then gets ~100 connections of 8 MiB buffers: measured on a 1 GiB GET (bench/, cold server cache,
# 4 alternated runs), median 3.5 s with sys time 1.7-3.0 s (buffer page faults) vs 2.3 s with 16 MiB parts over 8
# connections; aws s3 sync 2.9 s, s5cmd 1.4 s. Parts of 32-64 MiB were slower again.
LARGE_PART_BYTES = 16 * 2**20
LARGE_CONNECTIONS = 8

GET, PUT = "GET", "PUT"
# A call that takes longer than this logs a progress line this often (batch logs have no progress bar).
PROGRESS_SECONDS = float(os.environ.get("CVTK_JOB_PROGRESS_SECONDS", "10"))
log = logging.getLogger("cvtk_job.storage")


class Progress:
    """Files and bytes moved by one call, logged every PROGRESS_SECONDS with the rate and the time left.
    `total_bytes` is None when the sizes are not known in advance (objects named by a COCO file): the time
    left is then estimated from the files."""

    def __init__(self, what, files, total_bytes=None):
        self.what, self.files, self.total = what, files, total_bytes
        self.done_files = self.done_bytes = 0
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()

    def add(self, nbytes=0, files=0):
        with self._lock:
            self.done_bytes += nbytes
            self.done_files += files

    def line(self):
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = self.done_bytes / elapsed
        if self.total and self.done_bytes:
            left = (self.total - self.done_bytes) / max(rate, 1e-6)
        elif self.done_files:
            left = (self.files - self.done_files) * elapsed / self.done_files
        else:
            left = None
        size = f"{self.done_bytes / 2**20:,.0f}" + (f" of {self.total / 2**20:,.0f}" if self.total else "")
        return (f"{self.what}: {self.done_files:,} of {self.files:,} files, {size} MiB, {rate / 2**20:,.1f} MiB/s"
                + (f", about {left:,.0f} s left" if left is not None else ""))

    def maybe_log(self):
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            log.info("%s", self.line())


class Item:
    """One transfer. GET: `uri` into `path` (written as path.part-…, then renamed), conditional on `etag`
    when given (304: `unchanged`). PUT: `path` to `uri`. After `run`: `result` is "done", "unchanged" or
    "missing", and `etag`/`size` what the server said."""

    __slots__ = ("op", "uri", "path", "if_none_match", "result", "etag", "size", "attempts", "error", "request",
                 "tmp", "progress")

    def __init__(self, op, uri, path, if_none_match=None, size=None, etag=None):
        self.op, self.uri, self.path, self.if_none_match = op, uri, path, if_none_match
        self.size, self.etag = size, etag  # known from a listing: no callbacks are needed to learn them
        self.result = self.error = self.request = self.tmp = None
        self.attempts = self.progress = 0


class Budget:
    """A call's retry policy and cancellation: transfers retry while the call progresses (any byte moved or
    object finished pushes the deadline RETRY_SECONDS ahead), so a long staging still survives a restarting
    server at its end, and a dead server fails 10,000 queued objects together, not each after its own wait."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.monotonic()
        self.deadline = self.start + seconds
        self.failed = threading.Event()

    def progressed(self):
        self.deadline = time.monotonic() + self.seconds

    def elapsed(self):
        return time.monotonic() - self.start


_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


def _crt_credentials(credentials):
    """boto3's credentials as a CRT credentials provider. Fixed keys (environment, config file) are handed over
    once; credentials that expire (roles, SSO, web identity) are asked of boto3 at each signing, which refreshes
    them. Asking at each signing takes the GIL on the CRT's threads once per request: handing fixed keys over
    once made staging 1,000 small images 6% faster (0.93 vs 0.99 s, median of 7 alternated runs, this machine)."""
    from awscrt import auth
    from botocore.credentials import RefreshableCredentials
    from s3transfer.crt import BotocoreCRTCredentialsWrapper

    if credentials is None:
        return None
    if isinstance(credentials, RefreshableCredentials):
        return BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider()
    frozen = credentials.get_frozen_credentials()
    return auth.AwsCredentialsProvider.new_static(frozen.access_key, frozen.secret_key, frozen.token)


class Engine:
    """One CRT S3 client for one endpoint and one set of credentials (boto3's chain, refreshed by boto3)."""

    def __init__(self, boto_client, credentials):
        from awscrt import auth, io, s3

        self._boto = boto_client
        scheme, self._host, _, _, _ = urllib.parse.urlsplit(boto_client.meta.endpoint_url)
        region = boto_client.meta.region_name or "us-east-1"
        provider = _crt_credentials(credentials)
        loop = io.EventLoopGroup()
        self._s3 = s3
        self._client = s3.S3Client(
            bootstrap=io.ClientBootstrap(loop, io.DefaultHostResolver(loop)), region=region,
            signing_config=s3.create_default_s3_signing_config(region=region, credential_provider=provider)
            if provider else None,
            tls_mode=s3.S3RequestTlsMode.ENABLED if scheme == "https" else s3.S3RequestTlsMode.DISABLED,
            part_size=PART_BYTES, multipart_upload_threshold=PART_BYTES, throughput_target_gbps=10,
            retry_config=s3.S3RetryConfig(max_retries=2), connect_timeout_ms=5000)
        self._auth = auth
        self._bases = {}
        self._lock = threading.Lock()

    def _url(self, uri):
        """(host, path) of an object, addressed the way boto3 addresses it (virtual-hosted or path style,
        custom endpoints, FIPS…): boto3 resolves one URL per bucket, the key is appended to it."""
        bucket, _, key = uri[len("s3://"):].partition("/")
        with self._lock:
            if bucket not in self._bases:
                probe = self._boto.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "k"},
                                                          ExpiresIn=60)
                parts = urllib.parse.urlsplit(probe)
                self._bases[bucket] = (parts.netloc, parts.path[:-1])
            host, base = self._bases[bucket]
        return host, base + urllib.parse.quote(key, safe="/~")

    def _submit(self, item, finished, progress, budget, folders):
        from awscrt import http

        s3 = self._s3
        counter = progress
        host, path = self._url(item.uri)
        headers = [("Host", host)]
        item.attempts += 1
        progress.add(-item.progress)  # a retried transfer starts over
        item.progress = 0
        if item.op == GET:
            item.tmp = f"{item.path}.part-{os.getpid()}-{id(item)}"
            folder = os.path.dirname(item.path) or "."
            if folder not in folders:
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as err:
                    raise StorageError(f"{item.uri}: cannot create {folder} in the local cache ({err.strerror}); "
                                       "free disk space or set CVTK_JOB_CACHE to a writable folder") from None
                folders.add(folder)
            if item.if_none_match:
                headers.append(("If-None-Match", item.if_none_match))
            kind, extra = s3.S3RequestType.GET_OBJECT, {"recv_filepath": item.tmp}
            size = item.size
        else:
            size = os.path.getsize(item.path)
            headers.append(("Content-Length", str(size)))
            kind, extra = s3.S3RequestType.PUT_OBJECT, {"send_filepath": item.path}
        if size is not None and size >= PART_BYTES:
            extra.update(part_size=LARGE_PART_BYTES, max_active_connections_override=LARGE_CONNECTIONS)

        def on_headers(status_code, headers, **_):
            for name, value in headers:
                if name.lower() == "etag":
                    item.etag = value

        def on_progress(progress, **_):
            item.progress += progress
            counter.add(progress)
            budget.progressed()  # no wake-up: the loop only needs the later deadline

        def on_done(error=None, status_code=None, error_body=None, **_):
            finished((item, error, status_code, error_body))

        # Every callback takes the GIL on the CRT's threads: small objects of known size and ETag get only on_done.
        known = item.op == GET and item.etag is not None and item.size is not None and item.size < PART_BYTES
        item.request = self._client.make_request(
            type=kind, request=http.HttpRequest(item.op, path, http.HttpHeaders(headers)),
            on_headers=None if known else on_headers, on_progress=None if known else on_progress, on_done=on_done,
            **extra)

    def run(self, items, what, retry_seconds, on_item=None, total_bytes=None):
        """Transfer every item; raises StorageError/UserError as described in the module docstring."""
        budget = Budget(retry_seconds)
        progress = Progress(what, len(items), total_bytes)
        queue = collections.deque(items)
        retries = []  # heap of (when, n, item)
        active = set()
        events = collections.deque()
        cond = threading.Condition()
        done = 0
        folders = set()

        def finished(event):
            with cond:
                events.append(event)
                cond.notify()

        failure = None
        try:
            while queue or retries or active:
                now = time.monotonic()
                while retries and retries[0][0] <= now:
                    item = heapq.heappop(retries)[2]
                    self._submit(item, finished, progress, budget, folders)
                    active.add(item)  # only once submitted: `_cancel` cancels each one's request
                # While a transfer waits to be retried, no new ones start: against a server that is gone they
                # would only fail too (and 10,000 of them would spin until the deadline).
                while queue and len(active) < WINDOW and not retries:
                    item = queue.popleft()
                    self._submit(item, finished, progress, budget, folders)
                    active.add(item)
                with cond:
                    if not events:
                        wake = min([budget.deadline] + ([retries[0][0]] if retries else []))
                        cond.wait(max(0.0, min(wake - time.monotonic(), 1.0)))
                    batch = list(events)
                    events.clear()
                for item, error, status, body in batch:
                    active.discard(item)
                    outcome = self._outcome(item, error, status, body)
                    if outcome is None:  # retryable
                        if time.monotonic() >= budget.deadline:
                            failure = item
                            break
                        delay = min(0.5 * 2 ** (item.attempts - 1), 8.0)
                        heapq.heappush(retries, (time.monotonic() + delay, id(item), item))
                        continue
                    if isinstance(outcome, Exception):
                        failure = item
                        break
                    done += 1
                    progress.add(nbytes=(item.size or 0) if item.result == "done" and not item.progress else 0, files=1)
                    budget.progressed()
                    if on_item:
                        on_item(item)
                if failure is not None:
                    break
                progress.maybe_log()
                if time.monotonic() >= budget.deadline and (active or retries):
                    failure = next(iter(active), None) or retries[0][2]
                    failure.error = failure.error or StorageError(
                        f"{failure.uri}: no S3 transfer progressed for {budget.seconds:.0f} s; retry later")
                    break
        finally:
            if failure is not None or active:
                budget.failed.set()
                self._cancel(active, cond, events)
        if failure is not None:
            err = failure.error
            if isinstance(err, StorageError):
                raise StorageError(f"{err} ({what}: stopped after {budget.elapsed():.0f} s, {done} of {len(items)} "
                                   "finished)") from None
            raise err

    def _cancel(self, active, cond, events):
        """Cancel what is in flight and wait for the CRT to report each one (their part files are removed)."""
        for item in active:
            item.request.cancel()
        deadline = time.monotonic() + 10
        while active and time.monotonic() < deadline:
            with cond:
                if not events:
                    cond.wait(0.5)
                batch = list(events)
                events.clear()
            for item, *_ in batch:
                active.discard(item)
                self._discard(item)

    @staticmethod
    def _discard(item):
        if item.tmp:
            try:
                os.unlink(item.tmp)
            except FileNotFoundError:
                pass

    def _outcome(self, item, error, status, body):
        """An item's end: "done"/"unchanged"/"missing" (set on the item), an Exception (stop the call), or None
        (retry it)."""
        if error is None and status in (200, 206):
            if item.op == GET:
                if not os.path.exists(item.tmp):  # an empty object: nothing was written
                    open(item.tmp, "wb").close()
                item.size = os.path.getsize(item.tmp)
                os.replace(item.tmp, item.path)
            else:
                item.size = os.path.getsize(item.path)
            item.result = "done"
            return item.result
        self._discard(item)
        if status == 304 and item.op == GET:
            item.result = "unchanged"
            return item.result
        code = (_CODE.search(body or b"") or [None, b""])[1].decode("ascii", "replace")
        if status == 404 and code != "NoSuchBucket" and item.op == GET:
            item.result = "missing"
            return item.result
        from . import storage

        if status in (401, 403, 404) or code in storage.USER_ERROR_CODES:
            what = storage.USER_ERROR_CODES.get(code) or storage.USER_ERROR_CODES.get(str(status), f"HTTP {status}")
            hint = storage.CREDENTIALS_HINT if status in (401, 403) else "check the bucket and key"
            item.error = UserError(f"{item.uri}: {what} ({code or status}); {hint}")
            return item.error
        name = getattr(error, "name", type(error).__name__) if error else f"HTTP {status}"
        if status is None and ("CONNECTION_REFUSED" in str(name) or "HOST" in str(name)):
            item.error = StorageError(f"{item.uri}: cannot reach the S3 endpoint {self._host} ({name}); check "
                                      "AWS_ENDPOINT_URL_S3 and the network, then retry")
        else:
            item.error = StorageError(f"{item.uri}: S3 {'download' if item.op == GET else 'upload'} failed ({name}, "
                                      f"{code or status or 'no response'}), still failing after retries; retry later")
        return None
