"""A reply larger than one NATS message, sent as ordered parts and put back together by its caller.

A graph's outputs can be larger than the server's `max_payload` (a task returning a long text or a
big JSON array). Dropping such a reply made the caller take the replica for dead and run the graph
again; refusing it (`output_too_large`) lost an answer that was already computed. So a caller that
names a parts subject and the most it accepts (`InvokeRequest.reply_parts_subject`,
`InvokeRequest.max_reply_bytes`) gets a large reply as `count` messages on that subject, in order
(NATS keeps the order of one connection's messages to one subscriber), each carrying its position,
the count and the total size in headers. Nothing is sent on the reply subject then.

Both ends live here so that they cannot disagree. The assembler never trusts the headers: the total
must stay within the caller's cap, parts must come in order with the same count and total, and the
bytes must add up exactly; anything else is a `ReplyPartError`. The caller's deadlines (the graph's
reply deadline and the replica's keepalives) bound how long it waits for the parts.
"""

from __future__ import annotations

from collections.abc import Mapping

PART_HEADER = "Cornserve-Reply-Part"
"""The part's position, from 0."""
COUNT_HEADER = "Cornserve-Reply-Parts"
"""How many parts the reply has."""
TOTAL_HEADER = "Cornserve-Reply-Bytes"
"""The whole reply's size in bytes."""


class ReplyPartError(Exception):
    """A part that does not fit the reply announced so far, or a reply larger than the caller accepts.

    `too_large` tells the two apart: the announced reply exceeds the cap (the graph ran; its output
    is too big for this caller), versus a malformed or out-of-order part (a broken sender).
    """

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def split_reply(data: bytes, part_bytes: int) -> list[tuple[dict[str, str], bytes]]:
    """`data` as ordered parts of at most `part_bytes` bytes each, with their headers."""
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    chunks = [data[i : i + part_bytes] for i in range(0, len(data), part_bytes)] or [b""]
    total = str(len(data))
    count = str(len(chunks))
    return [
        ({PART_HEADER: str(index), COUNT_HEADER: count, TOTAL_HEADER: total}, chunk)
        for index, chunk in enumerate(chunks)
    ]


def _int_header(headers: Mapping[str, str], name: str) -> int:
    raw = headers.get(name)
    if raw is None:
        raise ReplyPartError(f"a reply part without its {name} header")
    try:
        value = int(raw)
    except ValueError:
        raise ReplyPartError(f"a reply part whose {name} header is not a number: {raw[:40]!r}") from None
    if value < 0:
        raise ReplyPartError(f"a reply part whose {name} header is negative: {value}")
    return value


class ReplyAssembler:
    """Collects the parts of one reply, in order, up to `max_bytes` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._parts: list[bytes] = []
        self._received = 0
        self._count: int | None = None
        self._total: int | None = None

    def add(self, headers: Mapping[str, str] | None, data: bytes) -> bytes | None:
        """Take the next part; the whole reply once its last part is in, else None.

        Raises ReplyPartError for a reply over the cap or a part that does not fit (see the module).
        """
        headers = headers or {}
        index = _int_header(headers, PART_HEADER)
        count = _int_header(headers, COUNT_HEADER)
        total = _int_header(headers, TOTAL_HEADER)
        if total > self.max_bytes:
            raise ReplyPartError(
                f"the graph's outputs are {total} bytes, more than this gateway accepts "
                f"({self.max_bytes} bytes, its --max-reply-bytes)",
                too_large=True,
            )
        if count == 0 or count > total + 1:
            raise ReplyPartError(f"a reply of {total} bytes cannot have {count} parts")
        if self._count is None:
            self._count, self._total = count, total
        elif (count, total) != (self._count, self._total):
            raise ReplyPartError(
                f"reply part {index} announces {count} parts / {total} bytes, earlier parts "
                f"{self._count} / {self._total}"
            )
        if index != len(self._parts):
            raise ReplyPartError(f"reply part {index} arrived where part {len(self._parts)} was due")
        self._received += len(data)
        if self._received > total:
            raise ReplyPartError(f"the reply's parts hold more than the {total} bytes announced")
        self._parts.append(data)
        if len(self._parts) < count:
            return None
        if self._received != total:
            raise ReplyPartError(f"the reply's {count} parts hold {self._received} bytes, not {total}")
        whole = b"".join(self._parts)
        self._parts = []
        return whole
