"""Fuzzing a running gateway from its own OpenAPI document with schemathesis, and counting what came back.

`GatewayFuzzer` loads `GET /openapi.json` (every fixed route plus each registered app's invoke
route, with the app's request schema), then, per operation, lets Hypothesis draw requests from it:
*positive* ones (valid for the document) and *negative* ones (bodies and parameters that violate
it: wrong types, missing fields, bytes that are not JSON). Every request is sent one at a time,
with a per-request deadline, and its status counted; a 5xx or a request that did not complete
is recorded with a curl command that repeats it. So is an answer whose status the document does not
list for the operation (schemathesis' `status_code_conformance`): the document must stay true.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.core.failures import FailureGroup
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import status_code_conformance

REQUEST_TIMEOUT_S = 60.0
"""No request may take longer (a hang fails the run); generous, for a loaded 2-core machine."""

Hook = Callable[[Case, requests.Response], None]


@dataclass
class FuzzStats:
    """What the gateway answered."""

    statuses: Counter[int] = field(default_factory=Counter)
    by_operation: dict[str, Counter[int]] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    """One line per 5xx: status, body excerpt, and a curl command that repeats the request."""
    no_answer: list[str] = field(default_factory=list)
    """Requests that failed at the transport (timeout, connection reset): the gateway hung or died."""
    unexpected: list[str] = field(default_factory=list)
    """Requests answered other than the run's `expect` allowed (e.g. anything but 401 without a token)."""
    undocumented: list[str] = field(default_factory=list)
    """Answers with a status the OpenAPI document does not list for the operation."""
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + len(self.no_answer)

    def summary(self) -> str:
        lines = [
            f"{self.requests} requests in {self.seconds:.1f} s; statuses: "
            + ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items())),
            f"5xx: {sum(n for code, n in self.statuses.items() if code >= 500)}, "
            f"no answer: {len(self.no_answer)}",
        ]
        for label, counts in sorted(self.by_operation.items()):
            lines.append(f"  {label}: " + ", ".join(f"{c}: {n}" for c, n in sorted(counts.items())))
        return "\n".join(lines)

    def failures(self) -> list[str]:
        return self.server_errors + self.no_answer + self.unexpected + self.undocumented


def load_schema(base_url: str, token: str) -> schemathesis.schemas.BaseSchema:
    """The gateway's live OpenAPI document (it needs an invoke-scope token) as a schemathesis schema."""
    reply = requests.get(
        f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {token}"}, timeout=REQUEST_TIMEOUT_S
    )
    reply.raise_for_status()
    return schemathesis.openapi.from_dict(reply.json())


@dataclass
class GatewayFuzzer:
    """Sends schema-drawn requests to one gateway and counts the answers in `stats`."""

    base_url: str
    schema: schemathesis.schemas.BaseSchema
    seed: int
    stats: FuzzStats = field(default_factory=FuzzStats)
    session: requests.Session = field(default_factory=requests.Session)

    def operations(self) -> list[APIOperation]:
        return [result.ok() for result in self.schema.get_all_operations()]

    def fuzz(
        self,
        operation: APIOperation,
        examples: int,
        *,
        headers: dict[str, str],
        modes: tuple[GenerationMode, ...] = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE),
        path_parameters: dict[str, Any] | None = None,
        expect: Callable[[int], bool] | None = None,
        after: Hook | None = None,
    ) -> None:
        """Up to `examples` requests per generation mode (fewer when the operation has fewer distinct ones).

        `headers` go with every request (they replace generated ones of the same name); `expect`,
        when given, must hold for every status; `after` sees every answered request (clean-up).
        """
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @seed(self.seed)
            @settings(
                max_examples=examples,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            )
            @given(case=strategy)
            def run(case: Case) -> None:
                self._send(case, headers, expect, after)

            # Unsatisfiable: nothing in this operation can be made invalid (no body, free-form parameters).
            with contextlib.suppress(Unsatisfiable):
                run()

    def _send(
        self,
        case: Case,
        headers: dict[str, str],
        expect: Callable[[int], bool] | None,
        after: Hook | None,
    ) -> None:
        label = case.operation.label
        started = time.monotonic()
        try:
            response = case.call(
                base_url=self.base_url, session=self.session, headers=headers, timeout=REQUEST_TIMEOUT_S
            )
        except requests.RequestException as exc:
            self.stats.no_answer.append(
                f"{label}: {type(exc).__name__}: {exc}\n  {self._curl(case, headers)}"
            )
            return
        finally:
            self.stats.seconds += time.monotonic() - started
        status = response.status_code
        self.stats.statuses[status] += 1
        self.stats.by_operation.setdefault(label, Counter())[status] += 1
        if status >= 500:
            self.stats.server_errors.append(
                f"{label} -> {status} {response.text[:300]!r}\n  {self._curl(case, headers)}"
            )
        elif expect is not None and not expect(status):
            self.stats.unexpected.append(
                f"{label} -> {status} {response.text[:300]!r}\n  {self._curl(case, headers)}"
            )
        try:
            case.validate_response(response, checks=[status_code_conformance])
        except FailureGroup:
            self.stats.undocumented.append(
                f"{label} -> {status}, a status the document does not list\n  {self._curl(case, headers)}"
            )
        if after is not None:
            after(case, response)

    def _curl(self, case: Case, headers: dict[str, str]) -> str:
        shown = {k: ("Bearer <token>" if k.lower() == "authorization" else v) for k, v in headers.items()}
        try:
            return case.as_curl_command(headers=shown, base_url=self.base_url)
        except Exception as exc:  # a body curl cannot show is still worth the status line
            return f"(no curl command: {type(exc).__name__}: {exc})"
