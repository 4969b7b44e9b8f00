"""Run a command; print its wall time (s) and the peak RSS (MiB) of it and its children, as JSON."""

import json
import resource
import subprocess
import sys
import time

start = time.perf_counter()
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
if result.returncode:
    sys.stderr.write(result.stderr[-4000:])
    sys.exit(result.returncode)
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall_s": wall, "peak_rss_mib": peak_kib / 1024}))
