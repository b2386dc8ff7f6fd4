"""The broker: the kext's device semantics over ZeroMQ, and the Python client.

The wire is specified in docs/broker-wire.md.
"""
