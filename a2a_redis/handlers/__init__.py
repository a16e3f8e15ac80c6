"""The SDK's request handlers, completed for many replicas.

The SDK's handlers were built for one process: a cancel acts only where it is received, and
the legacy handler's resubscribe and failure paths assume the agent runs locally. These
subclasses close those gaps over the backend's control plane; ``RedisBackend.request_handler``
returns them.
"""
