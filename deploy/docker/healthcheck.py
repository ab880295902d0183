"""The image health check: stdlib only, so it runs the same in every image.

A container whose service answers HTTP (the gateway) sets CORNSERVE_HEALTHCHECK_URL and is healthy
when that URL answers 200. Every other service talks only over NATS: it is healthy while the NATS
server it is configured with (CORNSERVE_NATS_URL; any of a cluster's) accepts a TCP connection, since without it the
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
    # A NATS cluster's URLs come comma-separated: healthy while any of its servers accepts.
    urls = [u.strip() for u in os.environ.get("CORNSERVE_NATS_URL", "nats://127.0.0.1:4222").split(",")]
    errors = []
    for url in filter(None, urls):
        nats = urllib.parse.urlsplit(url)
        try:
            with socket.create_connection((nats.hostname or "127.0.0.1", nats.port or 4222), TIMEOUT_S):
                return 0
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    print(f"unhealthy: NATS: {'; '.join(errors) or 'no URL'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
