-- An API-key check against a table in the settings: a request passes with
-- a key of `settings.keys`, sent as `X-Api-Key: KEY` or
-- `Authorization: Bearer KEY`; any other is answered 401. X-Api-Key is not
-- forwarded (the upstream has no use for it).
--
--   [extensions.keys]
--   kind = "lua"
--   script = "scripts/api-keys.lua"
--   settings = { keys = ["k-alpha", "k-beta"] }

-- Built once per worker thread, when its first request runs the script.
local valid = {}
for _, key in ipairs(settings.keys or {}) do
  valid[key] = true
end

local function key_of(req)
  local key = req.headers["x-api-key"]
  if key then
    return key
  end
  local authorization = req.headers["authorization"]
  return authorization and authorization:match("^[Bb][Ee][Aa][Rr][Ee][Rr]%s+(%S+)%s*$")
end

function on_request(req)
  local key = key_of(req)
  if not key or not valid[key] then
    return {
      status = 401,
      headers = { ["www-authenticate"] = 'Bearer realm="api"' },
      body = "401 unauthorized: send an API key (X-Api-Key: KEY or Authorization: Bearer KEY)\n",
    }
  end
  req.headers["x-api-key"] = nil
end
