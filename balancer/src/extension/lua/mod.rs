//! The built-in kind `lua`: request and response hooks written in Lua,
//! loaded with the configuration and reloaded with it.
//!
//! ```toml
//! [extensions.auth]
//! kind = "lua"
//! script = "scripts/auth.lua"        # relative to the configuration file
//! settings = { keys = ["k-1", "k-2"] } # the script's global `settings`
//! max_instructions = 1000000         # per call (default)
//! max_memory = "16MiB"               # per Lua state (default)
//! ```
//!
//! An instance is built once per load (and by `--check`): the script and the
//! modules it requires are read and compiled (a syntax error fails the load
//! with the file and line), the groups it names in literals are looked up,
//! and its top level is run once in a state of its own to find its hooks.
//! The requests then run in one Lua state per worker thread and instance,
//! made on that thread's first request from the compiled chunks; the
//! script's globals are per thread and never shared between threads. A
//! state that ran into a limit is dropped and made anew on the next call.
//!
//! A script that fails (an error, something unexpected returned, a limit
//! reached) answers that request `500`, is logged at most once a second per
//! instance and counted (see `metrics`); the balancer goes on serving.
//!
//! Lua 5.4 (mlua's `lua54`, built from source) rather than LuaJIT or Luau:
//! its count hook gives each call an exact instruction budget (LuaJIT does
//! not run hooks in JIT-compiled code, and Luau's interrupt counts calls and
//! loop edges, not instructions), mlua's allocator limits its memory (which
//! LuaJIT's own allocator does not allow), and the sandbox is plain: only
//! safe libraries are opened, and the few base functions that reach outside
//! are removed (see `sandbox`).

mod lend;
mod marshal;
mod metrics;
mod sandbox;
mod source;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use async_trait::async_trait;
use mlua::{Function, Value};
use serde::Deserialize;

use super::{
    Build, Decision, Extension, GroupRef, HookResult, Logged, Reply, RequestView, ResponseView,
};
use crate::config::ByteSize;
use lend::Lender;
use marshal::Plain;
use metrics::{Hook, Stats};
use sandbox::{Chunk, Failure, Limit, Limits, Sandbox};

/// `[extensions.NAME]` of kind `lua`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LuaSettings {
    /// The script, relative to the configuration file's folder.
    script: PathBuf,
    /// Handed to the script as its global `settings`.
    #[serde(default)]
    settings: toml::Table,
    /// Lua VM instructions one call of a hook may run.
    #[serde(default = "default_instructions")]
    max_instructions: NonZeroU32,
    /// Memory one Lua state (one per worker thread) may hold.
    #[serde(default = "default_memory")]
    max_memory: ByteSize,
}

/// About 10 ms of Lua on a slow machine: a loop that never ends is cut
/// well under a second, and no request's logic comes near it.
fn default_instructions() -> NonZeroU32 {
    NonZeroU32::new(1_000_000).unwrap_or(NonZeroU32::MIN)
}

fn default_memory() -> ByteSize {
    ByteSize(16 << 20)
}

/// What an instance was built from, shared by its states on every thread.
struct Program {
    /// Tells this build's states from those of others on the same thread.
    id: u64,
    main: Chunk,
    /// The modules `require` finds, by name.
    modules: BTreeMap<String, Chunk>,
    settings: toml::Value,
    limits: Limits,
    /// Every group of the configuration, for `upstream = name` computed at run time.
    groups: HashMap<String, GroupRef>,
    has_on_request: bool,
    has_on_response: bool,
    stats: Arc<Stats>,
    instance: Arc<str>,
}

/// A `lua` instance.
pub struct Script {
    program: Arc<Program>,
}

/// Builds an instance of kind `lua` (registered by `Registry::new`).
pub fn build(settings: LuaSettings, build: &mut Build<'_>) -> Result<Script, String> {
    let limits = Limits {
        instructions: settings.max_instructions.get(),
        memory: usize::try_from(settings.max_memory.0).unwrap_or(usize::MAX),
    };
    let named = settings.script.display().to_string();
    let text = build.read_to_string(&settings.script)?;
    let main = sandbox::compile(&named, &text).map_err(|e| format!("syntax error in {e}"))?;
    let folder = settings.script.parent().unwrap_or(Path::new(""));
    let (modules, named_groups) = read_modules(build, folder, &named, &text)?;
    for (file, group) in &named_groups {
        build
            .group(&group.text)
            .map_err(|e| format!("{file}:{}: {e}", group.line))?;
    }
    let names: Vec<String> = build.group_names().map(str::to_owned).collect();
    let mut groups = HashMap::new();
    for name in names {
        let group = build.group(&name)?;
        groups.insert(name, group);
    }
    static BUILDS: AtomicU64 = AtomicU64::new(0);
    let mut program = Program {
        id: BUILDS.fetch_add(1, Ordering::Relaxed),
        main,
        modules,
        settings: toml::Value::Table(settings.settings),
        limits,
        groups,
        has_on_request: true,
        has_on_response: true,
        stats: metrics::stats_for(build.instance()),
        instance: Arc::from(build.instance()),
    };
    // Its top level, run once here, finds its hooks and fails the load
    // rather than the requests.
    let state = State::new(&program).map_err(|failure| match failure {
        Failure::Script(why) => why,
        limit => failure_text(&limit, &program.limits),
    })?;
    if state.on_request.is_none() && state.on_response.is_none() {
        return Err(format!(
            "{named} defines neither on_request nor on_response: define at least one (function on_request(req) ... end)"
        ));
    }
    program.has_on_request = state.on_request.is_some();
    program.has_on_response = state.on_response.is_some();
    Ok(Script {
        program: Arc::new(program),
    })
}

/// Literals found in the script and its modules, each with its file.
type Found = Vec<(String, source::Literal)>;

/// The modules the script `named` (its `text`) requires, and theirs, read
/// and compiled; and the group names all of them give in literals.
fn read_modules(
    build: &mut Build<'_>,
    folder: &Path,
    named: &str,
    text: &str,
) -> Result<(BTreeMap<String, Chunk>, Found), String> {
    let mut modules = BTreeMap::new();
    let mut groups = Vec::new();
    let mut wanted = Vec::new();
    let mut found = |file: &str, text: &str, wanted: &mut Found| {
        let named = source::scan(text);
        groups.extend(named.groups.into_iter().map(|g| (file.to_owned(), g)));
        wanted.extend(named.modules.into_iter().map(|m| (file.to_owned(), m)));
    };
    found(named, text, &mut wanted);
    while let Some((by, module)) = wanted.pop() {
        if modules.contains_key(&module.text) {
            continue;
        }
        let at = format!("{by}:{}", module.line);
        let file = module_file(folder, &module.text).ok_or_else(|| {
            format!(
                "{at}: require {:?}: a module is named like \"keys\" or \"lib.keys\" (keys.lua or lib/keys.lua in the script's folder)",
                module.text
            )
        })?;
        let file_named = file.display().to_string();
        let text = build
            .read_to_string(&file)
            .map_err(|e| format!("{at}: require {:?}: {e}", module.text))?;
        let chunk =
            sandbox::compile(&file_named, &text).map_err(|e| format!("syntax error in {e}"))?;
        found(&file_named, &text, &mut wanted);
        modules.insert(module.text, chunk);
    }
    Ok((modules, groups))
}

/// The file of module `name` (`lib.keys` is `lib/keys.lua`) in `folder`;
/// `None` for a name that would leave it.
fn module_file(folder: &Path, name: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = name.split('.').collect();
    let plain = |p: &&str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if !parts.iter().all(plain) {
        return None;
    }
    Some(folder.join(parts.join("/") + ".lua"))
}

/// The Lua state of one program on one thread, its hooks, and the `req`
/// and `resp` it calls them with.
struct State {
    sandbox: Sandbox,
    on_request: Option<Function>,
    on_response: Option<Function>,
    req: Lender<RequestView<'static>>,
    resp: Lender<ResponseView<'static>>,
}

impl State {
    /// A state running `program`'s top level.
    fn new(program: &Program) -> Result<State, Failure> {
        let stats = Arc::clone(&program.stats);
        let instance = Arc::clone(&program.instance);
        let print = move |line: &str| {
            if stats.print_log.allow() {
                log::info!("extension {instance} (lua): {line}");
            }
        };
        let sandbox = Sandbox::new(program.limits, &program.modules, print)
            .map_err(|e| Failure::Script(sandbox::reason(&e)))?;
        let (on_request, on_response, req, resp) = sandbox.run(|lua| {
            let globals = lua.globals();
            globals.raw_set("settings", marshal::setting(lua, &program.settings)?)?;
            sandbox.call::<()>(&sandbox.load(&program.main)?, ())?;
            let hook = |name: &str| -> mlua::Result<Option<Function>> {
                match globals.raw_get::<Value>(name)? {
                    Value::Nil => Ok(None),
                    Value::Function(f) => Ok(Some(f)),
                    other => Err(mlua::Error::runtime(format!(
                        "{}: {name} is {}; it must be a function",
                        program.main.name,
                        marshal::kind(&other)
                    ))),
                }
            };
            Ok((
                hook("on_request")?,
                hook("on_response")?,
                Lender::request(lua)?,
                Lender::response(lua)?,
            ))
        })?;
        Ok(State {
            on_request,
            on_response,
            req,
            resp,
            sandbox,
        })
    }

    fn on_request(
        &self,
        view: &mut RequestView<'_>,
        program: &Program,
    ) -> Result<(Decision, Option<Plain>), Failure> {
        let Some(hook) = &self.on_request else {
            return Ok((Decision::Continue, None));
        };
        let (returned, ctx) = self.sandbox.run(|_| {
            let loan = self.req.lend(view);
            let returned: Value = self.sandbox.call(hook, self.req.handle())?;
            Ok((returned, loan.ctx()))
        })?;
        let decision = marshal::decision(returned, &program.groups).map_err(Failure::Script)?;
        let kept = match (program.has_on_response, ctx) {
            (true, Some(ctx)) => marshal::keep(&ctx).map_err(Failure::Script)?,
            _ => None,
        };
        Ok((decision, kept))
    }

    fn on_response(
        &self,
        view: &mut ResponseView<'_>,
        kept: Option<&Plain>,
    ) -> Result<(), Failure> {
        let Some(hook) = &self.on_response else {
            return Ok(());
        };
        let returned = self.sandbox.run(|lua| {
            let ctx = match kept {
                Some(kept) => match marshal::restore(lua, kept)? {
                    Value::Table(table) => Some(table),
                    _ => None,
                },
                None => None,
            };
            let _loan = self.resp.lend(view, ctx);
            self.sandbox.call::<Value>(hook, self.resp.handle())
        })?;
        match returned {
            Value::Nil => Ok(()),
            other => Err(Failure::Script(format!(
                "on_response returned {}: it returns nothing (it changes resp.headers)",
                marshal::kind(&other)
            ))),
        }
    }
}

/// One thread's states, one per program it has run.
struct Resident {
    id: u64,
    program: Weak<Program>,
    state: Rc<State>,
}

thread_local! {
    static STATES: RefCell<Vec<Resident>> = const { RefCell::new(Vec::new()) };
}

/// Runs `call` with this thread's state of `program`, made if needed. A
/// state that ran into a limit is dropped: the next call gets a fresh one.
fn with_state<R>(
    program: &Arc<Program>,
    call: impl FnOnce(&State) -> Result<R, Failure>,
) -> Result<R, Failure> {
    let found = STATES.with_borrow(|states| {
        states
            .iter()
            .find(|r| r.id == program.id)
            .map(|r| Rc::clone(&r.state))
    });
    let state = match found {
        Some(state) => state,
        None => {
            let state = Rc::new(State::new(program)?);
            STATES.with_borrow_mut(|states| {
                // The states of builds that reloads replaced go now: they
                // pile up on no thread, though one that makes no new state
                // keeps the last replaced ones until it does.
                states.retain(|r| r.program.strong_count() > 0);
                states.push(Resident {
                    id: program.id,
                    program: Arc::downgrade(program),
                    state: Rc::clone(&state),
                });
            });
            state
        }
    };
    let result = call(&state);
    if let Err(Failure::Limit(_)) = result {
        STATES.with_borrow_mut(|states| states.retain(|r| r.id != program.id));
    }
    result
}

/// `req.ctx` of each instance, kept from its `on_request` for its `on_response`.
#[derive(Clone, Default)]
struct Kept(Vec<(u64, Plain)>);

/// Why a call failed, for the log.
fn failure_text(failure: &Failure, limits: &Limits) -> String {
    match failure {
        Failure::Limit(Limit::Instructions) => format!(
            "used its whole instruction budget (max_instructions = {}): does a loop never end?",
            limits.instructions
        ),
        Failure::Limit(Limit::Memory) => format!(
            "ran out of memory (max_memory = {} bytes); its state is made anew",
            limits.memory
        ),
        Failure::Script(why) => why.clone(),
    }
}

impl Script {
    /// Counts a call and, when it failed, logs why (throttled).
    fn finish<R>(&self, hook: Hook, started: Instant, outcome: &Result<R, Failure>) {
        let program = &self.program;
        let limit = match outcome {
            Err(Failure::Limit(limit)) => Some(*limit),
            _ => None,
        };
        program
            .stats
            .called(hook, started.elapsed(), outcome.is_err(), limit);
        if let Err(failure) = outcome {
            if program.stats.failure_log.allow() {
                log::error!(
                    "extension {} (lua): {} failed, answered 500: {} (logged at most once a second; see balancer_lua_errors_total)",
                    program.instance,
                    hook.name(),
                    failure_text(failure, &program.limits)
                );
            }
        }
    }
}

#[async_trait]
impl Extension for Script {
    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        let program = &self.program;
        if !program.has_on_request {
            return Ok(Decision::Continue);
        }
        let started = Instant::now();
        let outcome = with_state(program, |state| state.on_request(req, program));
        self.finish(Hook::Request, started, &outcome);
        match outcome {
            Ok((decision, kept)) => {
                if let Some(kept) = kept {
                    let all = req.memo.get_mut::<Kept>();
                    match all {
                        Some(all) => all.0.push((program.id, kept)),
                        None => {
                            req.memo.insert(Kept(vec![(program.id, kept)]));
                        }
                    }
                }
                Ok(decision)
            }
            Err(_) => Ok(Decision::Respond(Reply::text(
                500,
                "500 internal error: a script could not handle the request\n",
            ))),
        }
    }

    async fn on_response(&self, resp: &mut ResponseView<'_>) -> HookResult<()> {
        let program = &self.program;
        if !program.has_on_response {
            return Ok(());
        }
        let kept = resp.memo.get_mut::<Kept>().and_then(|all| {
            let at = all.0.iter().position(|(id, _)| *id == program.id)?;
            Some(all.0.swap_remove(at).1)
        });
        let started = Instant::now();
        let outcome = with_state(program, |state| state.on_response(resp, kept.as_ref()));
        self.finish(Hook::Response, started, &outcome);
        outcome.map_err(|_| Logged.into())
    }
}
