"""Which vLLM is installed, and what that release takes (checked against vLLM's released sources).

The proxy asks the `vllm` executable for its version (`vllm --version`, which every release in the
supported range answers with the bare version) before starting it, and turns on only what that
release supports. The release boundaries below were read in the published wheels' sources; none
was run here (no GPU).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

Version = tuple[int, int, int]

TESTED_MIN: Version = (0, 13, 0)
"""The floor of the `vllm` extra: from 0.13 the chat server takes one `image_embeds` part per item
(several per request) and reads a single 2-D `[tokens, hidden]` tensor as one item."""
TESTED_MAX: Version = (0, 33, 0)
"""The newest release the extra resolves to and whose sources the proxy was checked against."""

MIXED_FORMS_RAISE: Version = (0, 15, 0)
"""From here vLLM raises `NotImplementedError` (HTTP 501 in 0.33) when one request mixes plain and
grid-carrying (`image_grid_thw`) embeddings; before, the mix fails later in the model's parser."""
EMBEDS_WITHOUT_TOWER: Version = (0, 16, 0)
"""From here `--enable-mm-embeds` lets embeddings through a modality whose `--limit-mm-per-prompt` is
0, and a zero limit for all of a tower's modalities skips loading that tower (earlier releases skip
the tower too but then refuse the embeddings)."""
VIDEO_EMBEDS: Version = (0, 29, 0)
"""From here the chat server has a `video_embeds` content part (Cornserve does not send it yet)."""

_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


class VersionError(RuntimeError):
    """`vllm --version` did not answer with a version within its deadline."""


def parse_version(text: str) -> Version | None:
    """`"0.16.0"`, `"0.16.1rc1.dev5+g…"`, `"v0.33"` → a (major, minor, patch) tuple; None if no line is one."""
    for line in reversed(text.strip().splitlines()):
        match = _VERSION.match(line.strip())
        if match:
            major, minor, patch = match.groups()
            return int(major), int(minor), int(patch or 0)
    return None


def version_text(version: Version) -> str:
    """(0, 16, 0) → `"0.16.0"`."""
    return ".".join(map(str, version))


@dataclass(frozen=True)
class VLLMFeatures:
    """What the installed vLLM takes, from its version."""

    version: Version

    @property
    def in_tested_range(self) -> bool:
        """Whether the version is within the `vllm` extra's range (`TESTED_MIN` to `TESTED_MAX`)."""
        return TESTED_MIN <= self.version <= TESTED_MAX

    @property
    def embeds_without_tower(self) -> bool:
        """Embeddings are accepted with a zero media limit, so the vision tower need not load."""
        return self.version >= EMBEDS_WITHOUT_TOWER

    @property
    def video_embeds(self) -> bool:
        """The chat server knows `video_embeds` content parts."""
        return self.version >= VIDEO_EMBEDS


async def detect_version(executable: str, timeout_s: float) -> Version:
    """`executable --version`, parsed; VersionError if it fails, prints no version, or overruns."""
    try:
        proc = await asyncio.create_subprocess_exec(
            executable,
            "--version",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        raise VersionError(f"cannot run {executable!r} --version: {exc}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        raise VersionError(f"{executable!r} --version did not answer within {timeout_s:g}s") from None
    finally:
        # Overran, or the proxy is stopping (cancelled): the child goes with the question.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    version = parse_version(text) if proc.returncode == 0 else None
    if version is None:
        raise VersionError(
            f"{executable!r} --version exited with {proc.returncode} and no version: {text.strip()[-300:]!r}"
        )
    return version
