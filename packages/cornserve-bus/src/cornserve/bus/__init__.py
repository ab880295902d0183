"""cornserve.bus: shared NATS subjects, pydantic wire schemas and ``nats.micro`` helpers."""
