-- A header-based canary: requests with `X-Canary: always` go to the group
-- `canary`, and their answers say so in `X-Canary`; every other request
-- goes where its route says. A share of the traffic can be sent there too
-- (`settings.percent`, by a hash of the request id, so a request's retries
-- land the same way).
--
--   [upstreams.canary]
--   servers = ["10.0.0.7:8000"]
--
--   [extensions.canary]
--   kind = "lua"
--   script = "scripts/canary.lua"
--   settings = { percent = 5 }

local percent = settings.percent or 0

local function in_share(id)
  local hash = 0
  for i = 1, #id do
    hash = (hash * 31 + id:byte(i)) % 100
  end
  return hash < percent
end

function on_request(req)
  local asked = req.headers["x-canary"]
  if asked == "never" then
    return
  end
  if asked == "always" or in_share(req.request_id) then
    req.ctx.canary = true
    return { upstream = "canary" }   -- checked at load: the group must exist
  end
end

function on_response(resp)
  if resp.ctx.canary then
    resp.headers["x-canary"] = "served"
  end
end
