"""Events from the bus (messages no one answers), validated or dropped with a warning.

Everything on the bus is untrusted. For a request there is a caller to answer ``bad_request``
(`micro`, `error_codec`); an event (a table, a usage report, a deployment change, a cancel, a
sidecar's start) has nobody to answer, so a malformed one is logged, naming the subject and the
first few problems, and dropped. Every subscription handler of such events parses through here, so
they all treat bad input alike.
"""

from __future__ import annotations

import logging
from typing import TypeVar

from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)

SHOWN_ERRORS = 3
"""Validation errors quoted in the warning (the rest would only repeat the same mistake)."""


def parse_event(model: type[M], msg: Msg, logger: logging.Logger) -> M | None:
    """``msg``'s data as ``model``; None, after a warning on ``logger``, when it is not one."""
    try:
        return model.model_validate_json(msg.data)
    except ValidationError as exc:
        logger.warning(
            "malformed %s on %s dropped: %s",
            model.__name__,
            msg.subject,
            exc.errors(include_url=False)[:SHOWN_ERRORS],
        )
        return None
