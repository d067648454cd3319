-- What every script of the store shares; the store sends it ahead of each
-- script's own source.

-- Redis's clock in µs since the epoch: a whole number, exact in a double
-- for centuries. A script asks once (a `TIME` call costs Redis about what
-- an `HINCRBY` does) and derives the ms and ns it needs from it.
local function clock_us()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end

-- `us` (from `clock_us`) in ns, as text: audit records' `ts`. `%d` writes
-- a whole number as `%.0f` does, at under half the cost.
local function ns_text(us)
  return string.format('%d', us) .. '000'
end

-- GCRA (the generic cell rate algorithm), for every rate limit: `key`
-- holds the theoretical arrival time (TAT), in µs since the epoch. Each
-- unit books `interval` µs (a whole number); at most `burst` units may be
-- booked ahead of now. Everything is counted in whole µs ahead of now, so
-- the sums stay exact.
-- Returns, without booking anything: whether `cost` units would be
-- booked, how many more would be after them (or now, if refused), the µs
-- until they would be (0 when they would), the µs booked ahead once they
-- are (or now, if refused), and the TAT to store to book them.
local function gcra_check(key, now_us, interval, burst, cost)
  local ahead = math.max(tonumber(redis.call('GET', key) or '0') - now_us, 0)
  local limit = interval * burst
  local after = ahead + interval * cost
  if after > limit then
    return false, math.max(0, math.floor((limit - ahead) / interval)), after - limit, ahead, nil
  end
  return true, math.floor((limit - after) / interval), 0, after, now_us + after
end

-- Books what `gcra_check` allowed: the state lives as long as it matters.
local function gcra_book(key, tat, interval, burst)
  redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil(interval * burst / 1000) + 1000)
end

-- Audit records: the layout of log-buffer's packed entries, which its
-- offloader ships as written. One field, `records`, holds the record as a
-- line of JSON strings, `ts` first and the other names sorted: the line a
-- record of a field per name would ship as. Why one field: reading
-- (`XREADGROUP`, and parsing a reply value per name and per value) is
-- paid per field, and a write's record had seven. Each script writes its
-- line in one concatenation, escaping only text from callers: building
-- it field by field from a list cost Redis 2.5 µs more per record.
local JSON_SPECIAL = '[%z\1-\31"\\]'
-- One special character escaped: a short escape where JSON has one, else
-- `\u00XX`. Looked up in constant strings, not a table, since a script's
-- whole source runs on every call and a table would be built each time.
local function json_escape(c)
  local short = string.find('"\\\b\f\n\r\t', c, 1, true)
  if short then return '\\' .. string.sub('"\\bfnrt', short, short) end
  return string.format('\\u%04x', string.byte(c))
end

-- `text` as it goes between the quotes of a JSON string, escaped as
-- serde_json escapes it, so that a line is the same whoever wrote it.
local function json_text(text)
  if string.find(text, JSON_SPECIAL) then
    text = string.gsub(text, JSON_SPECIAL, json_escape)
  end
  return text
end

-- Appends the audit record `line` to `stream`, capped at about `cap`
-- entries; returns the entry's id.
local function audit_add(stream, cap, line)
  return redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'records', line)
end

-- Stages the audit record `line` on `staged`, the staging list of
-- `stream` (log-buffer's `staging_list`), whose offloader moves staged
-- lines into packed entries of the stream before it reads it. Why: an
-- entry per record cost Redis and the offloader per entry (appending,
-- replicating, reading, trimming, and a reply value per part of the
-- entry); packed, the records of 64 writes share one. The list is
-- moved here once it holds 64 lines, into one entry capped as every
-- append is (`cap` entries: a shorter cap would also trim the entries of
-- one record that other appends add, unshipped), and at once when the
-- stream does not exist yet, since the offloader finds streams.
local function audit_stage(stream, staged, cap, line)
  local held = redis.call('RPUSH', staged, line)
  if held >= 64 or (held == 1 and redis.call('EXISTS', stream) == 0) then
    local lines = redis.call('LRANGE', staged, 0, -1)
    redis.call('DEL', staged)
    audit_add(stream, cap, table.concat(lines, '\n'))
  end
end
