"""Commands packed in RESP by hand, and scripted batches: many commands run by one EVALSHA.

:class:`Batch` is the body of a commit (``transaction.WatchedTransaction.commit``) or of an
unwatched atomic write (``transaction.run_atomically``): a list of commands run by one
``EVALSHA`` of :data:`BATCH_SCRIPT`, which the server applies exactly as if they were
queued one by one, while the client reads one reply instead of one per command. A script
may also lead the batch with work of its own (its own KEYS and ARGV first, then the
batch's), as the task store's save script does (``stores/save_body.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BATCH",
    "BATCH_BODY",
    "BATCH_CHECK",
    "BATCH_RUN",
    "BATCH_SCRIPT",
    "WITH_ENTRY_ID",
    "Batch",
    "Command",
    "Script",
    "batch_args",
    "bulk",
    "pack",
    "resp",
]

Command = tuple[Any, ...]

#: Runs ARGV as a batch of commands: ``argc name arg ... argc name arg ...``. A (S)PUBLISH
#: whose message starts with :data:`WITH_ENTRY_ID` publishes the id of the entry that was
#: last in the stream before the batch's last XADD ("0-0" if none), a space, that XADD's
#: id, a newline, and the rest of the message: a wake-up that carries its entry, and says
#: which entry it follows (so a reader can tell that nothing came in between).
#: Redis does not roll a script back when a command fails, so the script first checks
#: (:data:`BATCH_CHECK`) that every key it will write as a zset or a stream is of that type
#: (or absent), once per key: otherwise it writes nothing and replies ``WRONGTYPE <key>
#: ...``, naming the key. (The task hash needs no check: the read that precedes every write
#: of it, under WATCH, has already met it.) ``first`` is where the batch starts in ARGV: a
#: script may prepend arguments: :data:`BATCH_BODY` is the script without its first line,
#: for scripts that begin with their own checks and set ``first`` themselves; a script
#: that writes before the batch runs puts its writes between the check and
#: :data:`BATCH_RUN`.
BATCH_CHECK = b"""local want, seen = {ZADD = 'zset', ZREM = 'zset', XADD = 'stream'}, {}
local i = first
while i <= #ARGV do
  local kind, key = want[ARGV[i + 1]], ARGV[i + 2]
  if kind and not seen[key] then
    seen[key] = true
    local held = redis.call('TYPE', key)['ok']
    if held ~= 'none' and held ~= kind then
      return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. held .. ', not a ' .. kind)
    end
  end
  i = i + tonumber(ARGV[i]) + 1
end
"""
BATCH_RUN = b"""i = first
local added, prev = '', '0-0'
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  local name = ARGV[i + 1]
  if (name == 'PUBLISH' or name == 'SPUBLISH') and string.sub(ARGV[i + 3], 1, 3) == '$E:' then
    local ids = prev .. ' ' .. added .. '\\n'
    redis.call(name, ARGV[i + 2], ids .. string.sub(ARGV[i + 3], 4))
  else
    if name == 'XADD' then
      local tail = redis.call('XREVRANGE', ARGV[i + 2], '+', '-', 'COUNT', 1)
      prev = tail[1] and tail[1][1] or '0-0'
    end
    local reply = redis.call(unpack(ARGV, i + 1, i + argc))
    if name == 'XADD' then added = reply end
  end
  i = i + argc + 1
end
return 1
"""
BATCH_BODY = BATCH_CHECK + BATCH_RUN
BATCH_SCRIPT = b"local first = 1\n" + BATCH_BODY
WITH_ENTRY_ID = b"$E:"
_NOT_KEYS = frozenset({b"PUBLISH", b"SPUBLISH", b"MULTI", b"EXEC"})
_MULTI_KEY = frozenset({b"UNLINK", b"DEL"})


class Script:
    """A Lua script and the SHA-1 that names it on the server (for ``EVALSHA``)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: bytes) -> None:
        self.source = source
        self.sha = hashlib.sha1(source).hexdigest().encode()


BATCH = Script(BATCH_SCRIPT)


def _arg(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    raise TypeError(f"unsupported Redis argument type {type(value).__name__}")


def bulk(value: bytes) -> bytes:
    """``value`` as one RESP bulk string (an argument of a packed command)."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def resp(args: Sequence[bytes]) -> bytes:
    """One command (its arguments already bytes) in RESP."""
    return b"*%d\r\n%b" % (len(args), b"".join(map(bulk, args)))


def pack(commands: Sequence[Command | bytes]) -> bytes:
    """Encode commands in RESP (args: bytes, str or int); pre-packed bytes pass through."""
    return b"".join(c if isinstance(c, bytes) else resp([_arg(a) for a in c]) for c in commands)


class Batch:
    """The body of a commit: commands for :data:`BATCH_SCRIPT`, packed as they are added.

    :meth:`add_packed` takes a command's ARGV part (argument count, name, arguments, each a
    :func:`bulk` string) packed by the caller, who caches what it can of it. ``script``
    runs the batch; ``lead`` is what that script takes before the batch, packed: its key
    count, its KEYS, its argument count and its ARGV (see ``stores/save_body.py``).
    """

    __slots__ = ("_count", "_keys", "_lead", "_parts", "first_key", "script")

    def __init__(
        self, script: Script = BATCH, lead: tuple[int, bytes, int, bytes] = (0, b"", 0, b"")
    ) -> None:
        self.script = script
        self._lead = lead
        self._keys: dict[bytes, None] = {}
        self._parts: list[bytes] = []
        self._count = 0  # elements of ARGV
        self.first_key = b""  # the key of the first command (the slot, for messages)

    def add(self, command: Command) -> None:
        """Append ``command`` (args: bytes, str or int)."""
        args = [a if type(a) is bytes else _arg(a) for a in command]
        name = args[0] = args[0].upper()
        keys = args[1:] if name in _MULTI_KEY else [] if name in _NOT_KEYS else args[1:2]
        self.add_packed(len(args) + 1, b"".join(map(bulk, [b"%d" % len(args), *args])), *keys)

    def add_packed(self, count: int, packed: bytes, *keys: bytes) -> None:
        """Append a command packed as ``count`` ARGV elements, touching ``keys``."""
        if not self._count and not self.first_key and keys:
            self.first_key = keys[0]
        self._keys.update(dict.fromkeys(keys))
        self._parts.append(packed)
        self._count += count

    def packed(self) -> bytes:
        """The EVALSHA running the batch, declaring every key it touches."""
        lead_keys, lead_packed, lead_count, lead_args = self._lead
        keys = self._keys
        count = lead_keys + len(keys)
        head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%b\r\n" % (
            3 + count + lead_count + self._count,
            self.script.sha,
        )
        parts = [head, bulk(b"%d" % count), lead_packed, *map(bulk, keys), lead_args]
        return b"".join([*parts, *self._parts])


def batch_args(commands: Sequence[Command]) -> tuple[list[bytes], list[bytes]]:
    """KEYS and ARGV of :data:`BATCH_SCRIPT` running ``commands``."""
    keys: dict[bytes, None] = {}
    argv: list[bytes] = []
    for command in commands:
        args = [
            a if type(a) is bytes else a.encode() if type(a) is str else _arg(a) for a in command
        ]
        name = args[0] = args[0].upper()
        if name in _MULTI_KEY:
            keys.update(dict.fromkeys(args[1:]))
        elif name not in _NOT_KEYS and len(args) > 1:
            keys[args[1]] = None
        argv.append(b"%d" % len(args))
        argv += args
    return list(keys), argv
