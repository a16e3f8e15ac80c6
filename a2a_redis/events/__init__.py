"""SDK adapters for events: the V2 event stream and the legacy queue manager.

``RedisTaskEventStream`` and ``RedisQueueManager`` share one live listener and one lease
keeper per process, over each task's event log.
"""
