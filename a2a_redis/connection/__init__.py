"""Redis plumbing: clients (cluster, Sentinel), transactions, scripts, pub/sub links.

The bottom layer: it knows Redis and redis-py, and nothing of A2A or of our key layout.
"""
