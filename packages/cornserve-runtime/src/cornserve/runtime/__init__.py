"""The service runtime: one skeleton for every Cornserve service and executor process.

Settings, logging, the NATS connection, signal handling and drain, and process groups live here so that
auth, metrics, tracing and containers can be added to every service in one place.
"""
