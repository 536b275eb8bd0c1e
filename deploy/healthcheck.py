"""Container health probe: exit 0 when GET /health answers 200, else 1.

Used by the Dockerfiles' HEALTHCHECK (the slim images carry no curl). It works
for replicas and for the router alike, since both serve /health on the port in
PAGEDSERVE_PORT (8000 unless set).
"""
import os
import sys
import urllib.request

port = os.environ.get("PAGEDSERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception as exc:  # connection refused, 503 while loading, timeout
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
