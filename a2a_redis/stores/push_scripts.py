"""The Lua scripts of the push-config store (``stores/push_config_store.py``)."""

from __future__ import annotations

__all__ = ["DELETE", "SET"]

# KEYS[1] the hash; ARGV: field, envelope head, envelope tail, TTL in ms ("0": none), the
# most configs per task ("0": no limit).
# The envelope is head .. (seq as a msgpack uint64: 0xcf and 8 big-endian bytes) .. tail.
SET = b"""local key = KEYS[1]
local n = tonumber(redis.call('HGET', key, '#seq') or '0')
if not n or n < 0 or n ~= math.floor(n) then
  return redis.error_reply('A2A_CORRUPT the write counter is not an integer')
end
local limit = tonumber(ARGV[5])
if limit > 0 and redis.call('HEXISTS', key, ARGV[1]) == 0 then
  local count = redis.call('HLEN', key)
  if n > 0 then count = count - 1 end
  if count >= limit then return redis.error_reply('A2A_TOOMANY ' .. count) end
end
n = n + 1
local b = {}
local x = n
for i = 8, 1, -1 do
  b[i] = string.char(x % 256)
  x = math.floor(x / 256)
end
redis.call('HSET', key, '#seq', string.format('%d', n), ARGV[1],
  ARGV[2] .. '\\207' .. table.concat(b) .. ARGV[3])
if ARGV[4] ~= '0' then redis.call('PEXPIRE', key, ARGV[4]) end
return n
"""

# KEYS[1] the hash; ARGV: "one" and a field, or "owner" and the owner's field prefix.
# Returns how many configs were deleted; removes the hash when only the counter is left.
DELETE = b"""local key = KEYS[1]
local n = 0
if ARGV[1] == 'one' then
  n = redis.call('HDEL', key, ARGV[2])
else
  local p = ARGV[2]
  local doomed = {}
  for _, f in ipairs(redis.call('HKEYS', key)) do
    if string.sub(f, 1, #p) == p then doomed[#doomed + 1] = f end
  end
  for i = 1, #doomed, 1000 do
    n = n + redis.call('HDEL', key, unpack(doomed, i, math.min(i + 999, #doomed)))
  end
end
if n > 0 and redis.call('HLEN', key) == 1 and redis.call('HEXISTS', key, '#seq') == 1 then
  redis.call('DEL', key)
end
return n
"""
