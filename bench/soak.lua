-- Mixed traffic for bench/soak.sh: proxied, cached and JSON paths in turn.
local paths = { "/", "/info", "/cache-me", "/", "/cache-me?v=2" }
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
