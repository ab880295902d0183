"""The image health check: stdlib only, so it runs the same in every image.

A container whose service answers HTTP (the gateway) sets CORNSERVE_HEALTHCHECK_URL and is healthy
when that URL answers 200. Every other service talks only over NATS: it is healthy while the NATS
server it is configured with (CORNSERVE_NATS_URL) accepts a TCP connection, since without it the
service can do nothing. Exit 0 is healthy, 1 unhealthy (Docker's convention).
"""

import os
import socket
import sys
import urllib.parse
import urllib.request

TIMEOUT_S = 4.0


def main() -> int:
    """Check the service's health once; the exit code is the verdict."""
    url = os.environ.get("CORNSERVE_HEALTHCHECK_URL")
    if url:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                return 0 if response.status == 200 else 1
        except OSError as exc:
            print(f"unhealthy: {url}: {exc}", file=sys.stderr)
            return 1
    nats = urllib.parse.urlsplit(os.environ.get("CORNSERVE_NATS_URL", "nats://127.0.0.1:4222"))
    try:
        with socket.create_connection((nats.hostname or "127.0.0.1", nats.port or 4222), TIMEOUT_S):
            return 0
    except OSError as exc:
        print(f"unhealthy: NATS at {nats.hostname}:{nats.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
