-- A security header set on every HTML response: the headers below (or the
-- ones of `settings.headers`, which replace them), added where the upstream
-- did not send them already.
--
--   [extensions.security]
--   kind = "lua"
--   script = "scripts/security-headers.lua"
--   settings = { headers = { "content-security-policy" = "default-src 'self'" } }

local headers = settings.headers or {
  ["content-security-policy"] = "default-src 'self'",
  ["x-content-type-options"] = "nosniff",
  ["x-frame-options"] = "DENY",
  ["referrer-policy"] = "strict-origin-when-cross-origin",
}

function on_response(resp)
  local content_type = resp.headers["content-type"]
  if not content_type or not content_type:lower():find("^text/html") then
    return
  end
  for name, value in pairs(headers) do
    if resp.headers[name] == nil then
      resp.headers[name] = value
    end
  end
end
