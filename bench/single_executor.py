"""What the benchmarks of one executor process share (`eric.py`, `llm_executor.py`).

A seeded random PNG as a `data:` URL (the request's image), starting a process with its output in
a log file, and waiting until its `/health` answers (or the process exits, or 180 s pass).
"""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

HEALTH_TIMEOUT_S = 180.0


def png_url(seed: int, size: int) -> str:
    """A `size` by `size` PNG of seeded noise, as a `data:` URL."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `cmd` with its output in `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_healthy(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[bytes]) -> None:
    """Until `url`/health answers 200; an exited process or the deadline raises."""
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            async with http.get(f"{url}/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} did not turn healthy within {HEALTH_TIMEOUT_S:g} s")
