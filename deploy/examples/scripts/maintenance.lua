-- A maintenance switch: while `settings.enabled` is true, every request is
-- answered 503 with Retry-After, except from the addresses of
-- `settings.allow` (the team checking the site). Flip it in the TOML and
-- save: the reload makes the instance anew with the new settings.
--
--   [extensions.maintenance]
--   kind = "lua"
--   script = "scripts/maintenance.lua"
--   settings = { enabled = true, retry_after = 600, allow = ["10.0.0.5"] }
--
--   global_extensions = ["maintenance"]     # for every request

local allowed = {}
for _, ip in ipairs(settings.allow or {}) do
  allowed[ip] = true
end

function on_request(req)
  if not settings.enabled or allowed[req.client_ip] then
    return
  end
  return {
    status = 503,
    headers = { ["retry-after"] = settings.retry_after or 300 },
    body = settings.message or "503 down for maintenance, back soon\n",
  }
end
