"""The format: every key, every byte layout, and each task's event log.

``keys`` builds every key, ``codec`` lays out every record and entry, and ``event_log`` owns a
task's Redis Stream and its wake-ups. Built on ``connection``.
"""
