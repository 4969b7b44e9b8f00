"""Baseline: a plain sequential boto3 loop (list, then download one object after another)."""

import os
import sys

import boto3

bucket, prefix, dest = sys.argv[1:4]
client = boto3.client("s3")
for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
    for obj in page.get("Contents", []):
        path = os.path.join(dest, os.path.relpath(obj["Key"], prefix))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        client.download_file(bucket, obj["Key"], path)
