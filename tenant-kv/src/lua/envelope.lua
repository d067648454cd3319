-- Items under storage layout 2: one string each, a 45-byte header (all
-- integers big-endian: format 1 in one byte; version, created ms, updated
-- ms, expires ms or 0, and size in 8 bytes each; the metadata's length in
-- 4), then the metadata (JSON, or nothing) and the value.
local ENVELOPE = '>BI8I8I8I8I8I4'
local ENVELOPE_HEADER = 45

local function envelope(version, created, updated, expires, size, metadata, value)
  return struct.pack(ENVELOPE, 1, version, created, updated, expires, size, #metadata)
    .. metadata .. value
end

-- The item at `key`, from its header alone (whatever the value's size):
-- its version, created ms, expires ms (0: none) and size; nil if none.
local function envelope_header(key)
  local header = redis.call('GETRANGE', key, 0, ENVELOPE_HEADER - 1)
  if #header < ENVELOPE_HEADER then return nil end
  local _, version, created, _, expires, size = struct.unpack(ENVELOPE, header)
  return version, created, expires, size
end
