-- The quick start's script (deploy/balancer.toml routes /hello here): edit
-- this text and save, and the next request runs the new version. See the
-- README's "Scripting" for what a script can do.

function on_request(req)
  return {
    status = 200,
    body = "Hello from Lua! You asked for " .. req.path .. "\n",
  }
end
