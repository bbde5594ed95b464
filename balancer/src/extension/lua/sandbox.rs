//! The Lua state a script runs in, and what it may not do there.
//!
//! A state has Lua's `string`, `table`, `math`, `utf8` and `coroutine`
//! libraries and the base functions, less those that reach outside:
//! `dofile` and `loadfile` (files), `collectgarbage` (a script that stops the
//! collector fills its memory), `string.dump`, and `load` of bytecode (`load`
//! takes text only). There is no `io`, `os`, `package` or `debug`; `require`
//! finds only the modules of the script's folder that were read with it
//! (see `source`), and `print` writes to the balancer's log. Nothing offered
//! blocks the thread.
//!
//! Each call runs within an instruction budget (a count hook that fails the
//! call once it is spent) and each state within a memory limit (mlua's
//! allocator refuses what would pass it while the script runs). A script cannot catch either:
//! `pcall`, `xpcall` and `coroutine.resume` hand those failures on. Lua runs
//! two kinds of code with hooks off, which would escape the budget: a
//! message handler called for the hook's own error (so `xpcall` does not
//! call the script's handler for it) and finalizers (so `setmetatable`
//! refuses a metatable with `__gc`). What is not counted is time spent
//! inside one library function (a string pattern that backtracks over a
//! long subject): the memory limit bounds the subject.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;

use mlua::{
    ChunkMode, FromLuaMulti, Function, HookTriggers, IntoLuaMulti, Lua, LuaOptions, StdLib, Value,
    VmState,
};

/// The limits of one instance's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lua VM instructions per call of a hook (and for the script's top level).
    pub instructions: u32,
    /// Bytes one state may hold.
    pub memory: usize,
}

/// Which limit a call ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Instructions,
    Memory,
}

/// Why a call failed.
#[derive(Debug)]
pub enum Failure {
    /// It ran into a limit: the state may be in any shape and is not used again.
    Limit(Limit),
    /// The script failed (an error, or something it returned), with why.
    Script(String),
}

/// Lua source compiled to bytecode, with the name its errors give (the
/// file as the configuration names it, so `auth.lua:12: ...`).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub name: String,
    bytecode: Vec<u8>,
}

/// How often (in instructions) the count hook looks at the budget: often
/// enough to stop on time, rarely enough to cost nothing.
const HOOK_EVERY: u32 = 1000;

/// What Lua says when an allocation fails; a memory error a script caught
/// and raised again arrives as this text.
const OUT_OF_MEMORY: &str = "not enough memory";

/// Compiles `text` (Lua source, never bytecode) as the file `name`. The
/// error is Lua's, with the file and line (`auth.lua:3: '=' expected near 'x'`).
pub fn compile(name: &str, text: &str) -> Result<Chunk, String> {
    let lua = Lua::new_with(StdLib::NONE, LuaOptions::new()).map_err(|e| e.to_string())?;
    let function = lua
        .load(text)
        .set_name(format!("@{name}"))
        .set_mode(ChunkMode::Text)
        .into_function()
        .map_err(|e| reason(&e))?;
    Ok(Chunk {
        name: name.to_owned(),
        bytecode: function.dump(false),
    })
}

/// The instruction budget of the call under way.
struct Budget {
    /// Hook firings left before the call fails.
    left: Cell<u32>,
    /// Hook firings each call starts with.
    each_call: u32,
    /// The limit the current call ran into, if any.
    hit: Cell<Option<Limit>>,
}

/// One Lua state, sandboxed and limited.
pub struct Sandbox {
    lua: Lua,
    budget: Rc<Budget>,
    /// `Limits::memory`, in force while the script runs (see [`Sandbox::call`]).
    memory: usize,
}

/// Swaps the base functions that could get around the sandbox or its limits
/// for ones that cannot. Run once per state, with `limited` (a Rust function
/// saying whether an error is a limit) as its argument.
const PRELUDE: &str = r##"
local limited = ...
local rawload, rawpcall, rawxpcall, resume = load, pcall, xpcall, coroutine.resume
local rawsetmetatable, rawget, type, error, select = setmetatable, rawget, type, error, select
-- A limit is no error a script may catch: pass it on.
local function pass(ok, ...)
  if not ok and limited((...)) then error((...), 0) end
  return ok, ...
end
pcall = function(...) return pass(rawpcall(...)) end
-- Lua runs a message handler for an error raised by the count hook with
-- hooks off: the script's own handler must not run then.
xpcall = function(f, handler, ...)
  return pass(rawxpcall(f, function(e)
    if limited(e) then return e end
    return handler(e)
  end, ...))
end
coroutine.resume = function(...) return pass(resume(...)) end
-- Lua runs finalizers with hooks off: a script may not have any.
setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc is not allowed (finalizers would run outside the instruction budget)", 2)
  end
  return rawsetmetatable(t, mt)
end
load = function(chunk, name, _, ...)
  if select("#", ...) > 0 then return rawload(chunk, name, "t", ...) end
  return rawload(chunk, name, "t")
end
dofile, loadfile, collectgarbage, string.dump = nil, nil, nil, nil
"##;

/// `require`, over the modules read with the script (by name, each run once).
const REQUIRE: &str = r#"
local chunks = ...
local loaded, error, tostring = {}, error, tostring
require = function(name)
  local module = loaded[name]
  if module ~= nil then return module end
  local chunk = chunks[name]
  if chunk == nil then
    error("module '" .. tostring(name) .. "' is not available: require finds the modules of the "
      .. "script's folder that it names in a literal, such as require \"keys\" for keys.lua", 2)
  end
  module = chunk(name)
  if module == nil then module = true end
  loaded[name] = module
  return module
end
"#;

impl Sandbox {
    /// A state with the sandbox in place, `modules` for `require`, and
    /// `print` writing where `print` says.
    pub fn new(
        limits: Limits,
        modules: &BTreeMap<String, Chunk>,
        print: impl Fn(&str) + 'static,
    ) -> mlua::Result<Sandbox> {
        let libs = StdLib::STRING | StdLib::TABLE | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
        let lua = Lua::new_with(libs, LuaOptions::new())?;
        let step = HOOK_EVERY.min(limits.instructions.max(1));
        let budget = Rc::new(Budget {
            left: Cell::new(0),
            each_call: limits.instructions.div_ceil(step),
            hit: Cell::new(None),
        });
        let seen = Rc::clone(&budget);
        let limited = lua.create_function(move |_, error: Value| {
            if seen.hit.get().is_none() && error_text(&error).is_some_and(is_out_of_memory) {
                seen.hit.set(Some(Limit::Memory));
            }
            Ok(seen.hit.get().is_some())
        })?;
        lua.load(PRELUDE).set_name("=sandbox").call::<()>(limited)?;
        let tostring: Function = lua.globals().raw_get("tostring")?;
        let print = lua.create_function(move |_, args: mlua::Variadic<Value>| {
            let mut words = Vec::with_capacity(args.len());
            for arg in args {
                words.push(tostring.call::<mlua::String>(arg)?.to_string_lossy());
            }
            print(&words.join("\t"));
            Ok(())
        })?;
        lua.globals().raw_set("print", print)?;
        let chunks = lua.create_table()?;
        for (name, chunk) in modules {
            chunks.raw_set(name.as_str(), load(&lua, chunk)?)?;
        }
        lua.load(REQUIRE).set_name("=sandbox").call::<()>(chunks)?;
        // The sandbox is in place; from here on the script's own work counts.
        let counted = Rc::clone(&budget);
        lua.set_global_hook(
            HookTriggers::new().every_nth_instruction(step),
            move |_, _| {
                // Once spent, every firing fails again, in coroutines too.
                let left = counted.left.get().saturating_sub(1);
                counted.left.set(left);
                if left == 0 {
                    counted.hit.set(Some(Limit::Instructions));
                    return Err(mlua::Error::runtime("the instruction budget is spent"));
                }
                Ok(VmState::Continue)
            },
        )?;
        Ok(Sandbox {
            lua,
            budget,
            memory: limits.memory,
        })
    }

    /// Loads `chunk` into this state (a function, not run yet).
    pub fn load(&self, chunk: &Chunk) -> mlua::Result<Function> {
        load(&self.lua, chunk)
    }

    /// Calls the script's `function` with `args`, within the memory limit.
    ///
    /// The limit is on only while the script runs: the balancer's own work
    /// around the call (making `req`, reading what the script returned) is
    /// bounded by the request, not by the script, and with no limit set
    /// mlua does it without a protected call per operation, which would
    /// cost more than the script itself.
    pub fn call<R: FromLuaMulti>(
        &self,
        function: &Function,
        args: impl IntoLuaMulti,
    ) -> mlua::Result<R> {
        self.lua.set_memory_limit(self.memory)?;
        let result = function.call(args);
        self.lua.set_memory_limit(0)?;
        result
    }

    /// Runs `call` within a fresh instruction budget.
    pub fn run<R>(&self, call: impl FnOnce(&Lua) -> mlua::Result<R>) -> Result<R, Failure> {
        self.budget.left.set(self.budget.each_call);
        self.budget.hit.set(None);
        let result = call(&self.lua);
        if let Some(limit) = self.budget.hit.get() {
            return Err(Failure::Limit(limit));
        }
        result.map_err(|e| {
            if is_memory_error(&e) {
                Failure::Limit(Limit::Memory)
            } else {
                Failure::Script(reason(&e))
            }
        })
    }
}

fn load(lua: &Lua, chunk: &Chunk) -> mlua::Result<Function> {
    lua.load(&chunk.bytecode[..])
        .set_name(format!("@{}", chunk.name))
        .set_mode(ChunkMode::Binary)
        .into_function()
}

fn error_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.to_string_lossy()),
        Value::Error(e) => Some(e.to_string()),
        _ => None,
    }
}

fn is_out_of_memory(text: String) -> bool {
    text.ends_with(OUT_OF_MEMORY)
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        mlua::Error::WithContext { cause, .. } => is_memory_error(cause),
        mlua::Error::RuntimeError(text) => is_out_of_memory(message(text).to_owned()),
        _ => false,
    }
}

/// A Lua error in one line: Lua's message (which starts with the file and
/// line), or for an error raised by the balancer's side (an invalid header
/// value) where in the script it came from and what it says.
pub fn reason(e: &mlua::Error) -> String {
    match e {
        mlua::Error::RuntimeError(text) | mlua::Error::MemoryError(text) => {
            message(text).to_owned()
        }
        mlua::Error::SyntaxError { message: text, .. } => text.clone(),
        mlua::Error::CallbackError { traceback, cause } => match script_frame(traceback) {
            Some(at) => format!("{at}: {}", reason(cause)),
            None => reason(cause),
        },
        mlua::Error::WithContext { context, cause } => format!("{context}: {}", reason(cause)),
        mlua::Error::BadArgument { to, pos, cause, .. } => {
            let to = to.as_deref().unwrap_or("a function");
            format!("bad argument #{pos} to {to}: {}", reason(cause))
        }
        other => other.to_string(),
    }
}

/// A message without the traceback mlua adds to it.
fn message(text: &str) -> &str {
    text.split("\nstack traceback:").next().unwrap_or(text)
}

/// `auth.lua:12`: the first place in a traceback that is in a script.
fn script_frame(traceback: &str) -> Option<&str> {
    traceback
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.starts_with("[C]") && !l.starts_with("stack traceback") && !l.starts_with("sandbox")
        })
        .find_map(|l| l.split(": in ").next().filter(|at| at.contains(':')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        instructions: 100_000,
        memory: 4 << 20,
    };

    /// Runs `script` (a chunk that returns a value) in a fresh sandbox:
    /// what it returned, as `tostring` writes it.
    fn run(script: &str) -> Result<String, Failure> {
        let chunk = compile("test.lua", script).map_err(Failure::Script)?;
        let sandbox = Sandbox::new(LIMITS, &BTreeMap::new(), |_| {}).expect("a state");
        sandbox.run(|lua| {
            let value: Value = sandbox.call(&sandbox.load(&chunk)?, ())?;
            let tostring: Function = lua.globals().get("tostring")?;
            Ok(tostring.call::<mlua::String>(value)?.to_string_lossy())
        })
    }

    fn script_error(script: &str) -> String {
        match run(script) {
            Err(Failure::Script(why)) => why,
            other => panic!("{script}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn what_reaches_outside_is_not_there() {
        for global in "io os debug package dofile loadfile collectgarbage".split(' ') {
            let value = run(&format!("return {global}")).expect("runs");
            assert_eq!(value, "nil", "{global}");
        }
        assert_eq!(run("return string.dump").expect("runs"), "nil");
        let refused = run("local f = function() end\n\
             local ok, err = load(string.char(27) .. 'Lua')\n\
             return err")
        .expect("runs");
        assert!(refused.contains("binary"), "load of bytecode: {refused}");
        assert_eq!(
            run("return load('return 1 + 1')()").expect("text loads"),
            "2"
        );
        let why = script_error("return require('os')");
        assert!(why.contains("module 'os' is not available"), "{why}");
        let why = script_error("setmetatable({}, { __gc = function() while true do end end })");
        assert!(why.contains("__gc is not allowed"), "{why}");
    }

    #[test]
    fn an_endless_loop_spends_the_budget_and_cannot_catch_that() {
        for script in [
            "while true do end",
            "while true do pcall(function() while true do end end) end",
            "local co = coroutine.create(function() while true do end end)\n\
             while true do coroutine.resume(co) end",
            "while true do xpcall(function() while true do end end, function() while true do end end) end",
            "while true do xpcall(error, function() while true do end end) end",
        ] {
            assert!(
                matches!(run(script), Err(Failure::Limit(Limit::Instructions))),
                "{script}"
            );
        }
    }

    #[test]
    fn memory_is_limited_and_cannot_be_caught_either() {
        for script in [
            "return string.rep('x', 64 * 1024 * 1024)",
            "local t = {} for i = 1, 100 do t[i] = string.rep('x', 100000) .. i end",
            "local ok = pcall(string.rep, 'x', 64 * 1024 * 1024) return ok",
        ] {
            assert!(
                matches!(run(script), Err(Failure::Limit(Limit::Memory))),
                "{script}: {:?}",
                run(script)
            );
        }
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let why = compile("auth.lua", "local x = \n x x").expect_err("a syntax error");
        assert!(why.starts_with("auth.lua:2:"), "{why}");
        let why = script_error("local t = nil\nreturn t.x");
        assert!(why.starts_with("test.lua:2: attempt to index"), "{why}");
    }
}
