"""A real S3 server (SeaweedFS `weed mini` from PyPI) on 127.0.0.1, for tests and benchmarks.

Loopback only, every port explicit, telemetry off, credentials enforced (an identities file), and
stopped by its PID (TERM, then KILL).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "cvtk-test-access"
SECRET_KEY = "cvtk-test-secret-9f3e1c"  # tests assert this never appears in any output


def _free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SeaweedS3:
    def __init__(self, root):
        self.root = Path(root)
        self.data = self.root / "data"
        self.proc = None
        names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                 "admin", "admin.grpc"]
        self.ports = dict(zip(names, _free_ports(len(names)), strict=True))

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self, secret=SECRET_KEY):
        """Client environment: boto3's standard variables, nothing else."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self):
        self.data.mkdir(parents=True, exist_ok=True)
        (self.data / "mini.options").unlink(missing_ok=True)  # it re-reads old flags from there
        identities = self.root / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "cvtk-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        p = self.ports
        cmd = [weed, "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-master.port={p['master']}",
               f"-master.port.grpc={p['master.grpc']}", f"-volume.port={p['volume']}",
               f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port={p['filer']}",
               f"-filer.port.grpc={p['filer.grpc']}", f"-admin.port={p['admin']}",
               f"-admin.port.grpc={p['admin.grpc']}", "-admin.ui=false", "-webdav=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               "-master.telemetry.url=http://127.0.0.1:9/", "-master.volumeSizeLimitMB=256", "-volume.max=1000",
               f"-s3.config={identities}"]
        self.log = open(self.root / "weed.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout=60):
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=Config(retries={"total_max_attempts": 1}, connect_timeout=1))
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            try:
                client.list_buckets()
                bucket = f"ready-{os.getpid()}"
                if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key="probe")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def upload_tree(self, local, bucket, prefix):
        client = self.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")

    def keys(self, bucket, prefix=""):
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
