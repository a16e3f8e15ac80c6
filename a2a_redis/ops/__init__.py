"""Operations tools: the ``a2a-redis`` command line, ``doctor``, and the embedded server.

The top layer: it may use everything below; nothing below imports it.
"""
