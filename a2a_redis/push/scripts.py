"""The Lua scripts of push delivery.

State scripts run in the task's slot: ``KEYS[1]`` is ``keys.push_state(task)``, ``KEYS[2]``
``keys.task(task)``. The state hash holds, per config field ``F``: ``c:F`` the highest
version delivered or dead-lettered, ``p:F`` the stream position (``ms-seq``) of the last
entry settled in a log without versions (the legacy queue manager's, ``positions.py``),
``a:F`` ``"version:attempts:first ms"`` of the event being retried (the version, or the
position's mark), ``j:F`` the id of the job delivering to it (one live job per (task,
config)).
"""

from __future__ import annotations

__all__ = ["ADOPT", "ADVANCE", "FINISH", "GROUP", "RENEW"]

#: The consumer group of ``keys.push_jobs`` every replica's workers share.
GROUP = "a2a-push"

# ARGV: field, job id, "1" to take over from another job. Returns {-1, other job} when
# another job holds the config; else {cursor, task version, task state, attempts, position}.
ADOPT = b"""local f = ARGV[1]
local j = redis.call('HGET', KEYS[1], 'j:' .. f)
if j and j ~= ARGV[2] and ARGV[3] ~= '1' then return {-1, j} end
redis.call('HSET', KEYS[1], 'j:' .. f, ARGV[2])
local c = redis.call('HGET', KEYS[1], 'c:' .. f) or '0'
local a = redis.call('HGET', KEYS[1], 'a:' .. f) or ''
local h = redis.call('HMGET', KEYS[2], 'v', 's')
local p = redis.call('HGET', KEYS[1], 'p:' .. f) or ''
return {tonumber(c), tonumber(h[1] or '0'), tonumber(h[2] or '0'), a, p}
"""

# ARGV: field, job id, version delivered (or dead-lettered; "0": none), and for an entry
# without a version its stream position. Returns 0 when another job took the config over
# (this one stops), else 1.
ADVANCE = b"""local f = ARGV[1]
if redis.call('HGET', KEYS[1], 'j:' .. f) ~= ARGV[2] then return 0 end
local c = tonumber(redis.call('HGET', KEYS[1], 'c:' .. f) or '0')
if tonumber(ARGV[3]) > c then redis.call('HSET', KEYS[1], 'c:' .. f, ARGV[3]) end
if ARGV[4] then redis.call('HSET', KEYS[1], 'p:' .. f, ARGV[4]) end
redis.call('HDEL', KEYS[1], 'a:' .. f)
return 1
"""

# ARGV: field, job id. Releases the config; the state follows the task's TTL, and goes
# with the task when it is gone.
FINISH = b"""local f = ARGV[1]
if redis.call('HGET', KEYS[1], 'j:' .. f) == ARGV[2] then
  redis.call('HDEL', KEYS[1], 'j:' .. f)
end
local t = redis.call('PTTL', KEYS[2])
if t == -2 then
  redis.call('HDEL', KEYS[1], 'c:' .. f, 'a:' .. f, 'p:' .. f)
elseif t > 0 then
  redis.call('PEXPIRE', KEYS[1], t)
end
return t
"""

# KEYS[1] the jobs stream; ARGV: group, consumer, job ids. Resets the idle time of the
# jobs this consumer still holds; returns the ids it no longer holds.
RENEW = b"""local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][4] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""
