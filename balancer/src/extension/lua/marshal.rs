//! What passes between the balancer and a script: headers as `req.headers`
//! and `resp.headers` read and write them (see `lend` for `req` and `resp`
//! themselves), the table `on_request` returns (a [`Decision`]), `req.ctx`
//! kept as plain Rust values until `resp.ctx`, and the instance's
//! `settings`.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use mlua::{Function, Lua, Table, Value};
use pingora::http::{RequestHeader, ResponseHeader};

use crate::extension::{Decision, GroupRef, Reply};

/// Statuses a `redirect` may have, and its default: as a route's `redirect`.
const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];
const REDIRECT_STATUS: u16 = 308;

/// How deep `req.ctx` may nest, and how many values it may hold in all:
/// enough for any record, and a table that holds itself ends there.
const CTX_DEPTH: usize = 16;
const CTX_VALUES: usize = 10_000;

/// A request's or a response's headers, as `req.headers` and `resp.headers`
/// show them.
pub trait Headed: 'static {
    fn map(&self) -> &HeaderMap;
    fn insert(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()>;
    fn append(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()>;
    fn remove(&mut self, name: &HeaderName);
}

macro_rules! headed {
    ($ty:ty) => {
        impl Headed for $ty {
            fn map(&self) -> &HeaderMap {
                &self.headers
            }
            fn insert(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
                self.insert_header(name, value).map(|_| ())
            }
            fn append(&mut self, name: HeaderName, value: HeaderValue) -> pingora::Result<()> {
                self.append_header(name, value).map(|_| ())
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
        }
    };
}
headed!(RequestHeader);
headed!(ResponseHeader);

/// Every header of `map` (several fields of one name joined), for `pairs`.
pub fn all_headers(lua: &Lua, map: &HeaderMap) -> mlua::Result<(Function, Table, Value)> {
    let all = lua.create_table()?;
    for name in map.keys() {
        let key = Value::String(lua.create_string(name.as_str())?);
        all.raw_set(key.clone(), header(lua, map, &key)?)?;
    }
    let next: Function = lua.globals().raw_get("next")?;
    Ok((next, all, Value::Nil))
}

/// The value of header `name` (several joined with `, `), or `nil`.
pub fn header(lua: &Lua, map: &HeaderMap, name: &Value) -> mlua::Result<Value> {
    let Value::String(name) = name else {
        return Ok(Value::Nil);
    };
    let Ok(name) = HeaderName::from_bytes(&name.as_bytes()) else {
        return Ok(Value::Nil);
    };
    let mut values = map.get_all(&name).iter();
    let Some(first) = values.next() else {
        return Ok(Value::Nil);
    };
    let mut joined = first.as_bytes().to_vec();
    for more in values {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(more.as_bytes());
    }
    lua.create_string(joined).map(Value::String)
}

/// `headers[name] = value`: a string or number sets it, a list of them sets
/// one field each, `nil` removes it.
pub fn set_header<T: Headed>(
    target: &mut T,
    name: &mlua::String,
    value: Value,
) -> mlua::Result<()> {
    let name = HeaderName::from_bytes(&name.as_bytes()).map_err(|_| {
        mlua::Error::runtime(format!("{:?} is not a header name", name.to_string_lossy()))
    })?;
    let refused = |e: pingora::BError| mlua::Error::runtime(format!("header {name}: {e}"));
    match value {
        Value::Nil => target.remove(&name),
        Value::Table(list) => {
            target.remove(&name);
            for value in list.sequence_values::<Value>() {
                target
                    .append(name.clone(), header_value(&name, &value?)?)
                    .map_err(refused)?;
            }
        }
        value => target
            .insert(name.clone(), header_value(&name, &value)?)
            .map_err(refused)?,
    }
    Ok(())
}

fn header_value(name: &HeaderName, value: &Value) -> mlua::Result<HeaderValue> {
    let bytes = match value {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Integer(n) => n.to_string().into_bytes(),
        Value::Number(n) => n.to_string().into_bytes(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "header {name}: a value is a string or a number (or a list of them), not {}",
                kind(other)
            )))
        }
    };
    HeaderValue::from_bytes(&bytes).map_err(|_| {
        mlua::Error::runtime(format!(
            "header {name}: {:?} is not a valid value (no line breaks or control characters)",
            String::from_utf8_lossy(&bytes)
        ))
    })
}

/// What `on_request` returned, as a decision; the error says what was
/// unexpected. `groups` are the configuration's, by name.
pub fn decision(value: Value, groups: &HashMap<String, GroupRef>) -> Result<Decision, String> {
    let table = match value {
        Value::Nil => return Ok(Decision::Continue),
        Value::Table(table) => table,
        other => {
            return Err(format!(
                "on_request returned {}: return nothing, or a table (status, redirect, upstream or backend)",
                kind(&other)
            ))
        }
    };
    let mut fields: HashMap<String, Value> = HashMap::new();
    for pair in table.pairs::<Value, Value>() {
        let (key, value) = pair.map_err(|e| e.to_string())?;
        match key {
            Value::String(k)
                if matches!(
                    &*k.to_string_lossy(),
                    "status" | "body" | "headers" | "redirect" | "upstream" | "backend"
                ) =>
            {
                fields.insert(k.to_string_lossy(), value);
            }
            other => {
                return Err(format!(
                    "on_request returned a table with the key {}: the keys are status, body, headers, redirect, upstream and backend",
                    describe(&other)
                ))
            }
        }
    }
    let only = |key: &str| -> Result<(), String> {
        match fields.keys().find(|k| k.as_str() != key) {
            Some(other) => Err(format!(
                "on_request returned {key} with {other}: {key} goes alone"
            )),
            None => Ok(()),
        }
    };
    if let Some(name) = fields.get("upstream") {
        only("upstream")?;
        let name = text(name, "upstream")?;
        return groups.get(&name).cloned().map(Decision::Upstream).ok_or_else(|| {
            let mut known: Vec<&str> = groups.keys().map(String::as_str).collect();
            known.sort_unstable();
            format!(
                "on_request returned upstream = {name:?}, which is not a group of the configuration (the groups are: {})",
                known.join(", ")
            )
        });
    }
    if let Some(addr) = fields.get("backend") {
        only("backend")?;
        let addr = text(addr, "backend")?;
        return addr.parse::<SocketAddr>().map(Decision::Backend).map_err(|_| {
            format!("on_request returned backend = {addr:?}: write an IP address and a port, like \"10.0.0.7:8080\"")
        });
    }
    let headers = match fields.get("headers") {
        None | Some(Value::Nil) => HeaderMap::new(),
        Some(Value::Table(t)) => reply_headers(t)?,
        Some(other) => return Err(format!("headers is a table, not {}", kind(other))),
    };
    let status = match fields.get("status") {
        None => None,
        Some(Value::Integer(n)) => Some(u16::try_from(*n).unwrap_or(0)),
        Some(other) => return Err(format!("status is a whole number, not {}", describe(other))),
    };
    if let Some(location) = fields.get("redirect") {
        if fields.contains_key("body") {
            return Err(
                "on_request returned redirect with body: a redirect has a body of its own"
                    .to_owned(),
            );
        }
        let location = text(location, "redirect")?;
        let status = status.unwrap_or(REDIRECT_STATUS);
        if !REDIRECT_STATUSES.contains(&status) {
            return Err(format!(
                "redirect status {status} is not one of 301, 302, 303, 307, 308"
            ));
        }
        let value = HeaderValue::from_str(&location)
            .map_err(|_| format!("redirect = {location:?} is not a valid Location"))?;
        let mut reply = Reply::text(status, format!("{status} redirect to {location}\n"));
        reply.headers.extend(headers);
        reply.headers.insert(http::header::LOCATION, value);
        return Ok(Decision::Respond(reply));
    }
    let Some(status) = status else {
        return Err(
            "on_request returned a table without status, redirect, upstream or backend".to_owned(),
        );
    };
    if !(200..=599).contains(&status) {
        return Err(format!("status {status} must be from 200 to 599"));
    }
    let body = match fields.get("body") {
        None | Some(Value::Nil) => Bytes::new(),
        Some(Value::String(s)) => Bytes::copy_from_slice(&s.as_bytes()),
        Some(other) => return Err(format!("body is a string, not {}", describe(other))),
    };
    let mut reply = if body.is_empty() || headers.contains_key(http::header::CONTENT_TYPE) {
        Reply::new(status)
    } else {
        Reply::text(status, "")
    };
    reply.body = body;
    reply.headers.extend(headers);
    Ok(Decision::Respond(reply))
}

/// The `headers` of a returned table.
fn reply_headers(table: &Table) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for pair in table.pairs::<mlua::String, Value>() {
        let (name, value) = pair.map_err(|_| "headers: each name is a string".to_owned())?;
        let name = HeaderName::from_bytes(&name.as_bytes())
            .map_err(|_| format!("headers: {:?} is not a header name", name.to_string_lossy()))?;
        let values = match value {
            Value::Table(list) => list
                .sequence_values::<Value>()
                .collect::<mlua::Result<Vec<_>>>()
                .map_err(|e| e.to_string())?,
            one => vec![one],
        };
        for value in values {
            let value = header_value(&name, &value).map_err(|e| super::sandbox::reason(&e))?;
            headers.append(name.clone(), value);
        }
    }
    Ok(headers)
}

fn text(value: &Value, key: &str) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.to_string_lossy()),
        other => Err(format!("{key} is a string, not {}", describe(other))),
    }
}

/// What a value is, as an error message says it ("a string").
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "a boolean",
        Value::Integer(_) | Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Table(_) => "a table",
        Value::Function(_) => "a function",
        Value::Thread(_) => "a coroutine",
        _ => "a userdata",
    }
}

/// A value as an error message shows it.
fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Integer(n) => n.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        other => kind(other).to_owned(),
    }
}

/// A value of `req.ctx` as it is kept between the hooks: Lua values would
/// tie it to one thread's state, and the response may be handled on another.
#[derive(Debug, Clone, PartialEq)]
pub enum Plain {
    Boolean(bool),
    Integer(i64),
    Number(f64),
    String(Bytes),
    Table(Vec<(Plain, Plain)>),
}

/// `ctx` as plain values (`None` when it is empty), or why it cannot be kept.
pub fn keep(ctx: &Table) -> Result<Option<Plain>, String> {
    if ctx.is_empty() {
        return Ok(None);
    }
    let mut count = 0;
    plain(&Value::Table(ctx.clone()), "req.ctx", 0, &mut count).map(Some)
}

fn plain(value: &Value, at: &str, depth: usize, count: &mut usize) -> Result<Plain, String> {
    *count += 1;
    if *count > CTX_VALUES {
        return Err(format!("req.ctx holds more than {CTX_VALUES} values"));
    }
    Ok(match value {
        Value::Boolean(b) => Plain::Boolean(*b),
        Value::Integer(n) => Plain::Integer(*n),
        Value::Number(n) => Plain::Number(*n),
        Value::String(s) => Plain::String(Bytes::copy_from_slice(&s.as_bytes())),
        Value::Table(t) if depth < CTX_DEPTH => {
            let mut pairs = Vec::new();
            for pair in t.pairs::<Value, Value>() {
                let (k, v) = pair.map_err(|e| e.to_string())?;
                let inner = format!("{at}[{}]", describe(&k));
                pairs.push((plain(&k, &inner, depth + 1, count)?, plain(&v, &inner, depth + 1, count)?));
            }
            Plain::Table(pairs)
        }
        Value::Table(_) => {
            return Err(format!("{at} nests tables more than {CTX_DEPTH} deep (does a table hold itself?)"))
        }
        other => {
            return Err(format!(
                "{at} is {}, which cannot be kept for on_response: keep strings, numbers, booleans and tables of them",
                kind(other)
            ))
        }
    })
}

/// `kept` as Lua values again.
pub fn restore(lua: &Lua, kept: &Plain) -> mlua::Result<Value> {
    Ok(match kept {
        Plain::Boolean(b) => Value::Boolean(*b),
        Plain::Integer(n) => Value::Integer(*n),
        Plain::Number(n) => Value::Number(*n),
        Plain::String(s) => Value::String(lua.create_string(s)?),
        Plain::Table(pairs) => {
            let table = lua.create_table_with_capacity(0, pairs.len())?;
            for (k, v) in pairs {
                table.raw_set(restore(lua, k)?, restore(lua, v)?)?;
            }
            Value::Table(table)
        }
    })
}

/// A TOML value of the instance's `settings` as Lua sees it: tables and
/// arrays as tables, dates as strings.
pub fn setting(lua: &Lua, value: &toml::Value) -> mlua::Result<Value> {
    Ok(match value {
        toml::Value::String(s) => Value::String(lua.create_string(s)?),
        toml::Value::Integer(n) => Value::Integer(*n),
        toml::Value::Float(n) => Value::Number(*n),
        toml::Value::Boolean(b) => Value::Boolean(*b),
        toml::Value::Datetime(d) => Value::String(lua.create_string(d.to_string())?),
        toml::Value::Array(items) => {
            let table = lua.create_table_with_capacity(items.len(), 0)?;
            for item in items {
                table.raw_push(setting(lua, item)?)?;
            }
            Value::Table(table)
        }
        toml::Value::Table(entries) => {
            let table = lua.create_table_with_capacity(0, entries.len())?;
            for (key, item) in entries {
                table.raw_set(key.as_str(), setting(lua, item)?)?;
            }
            Value::Table(table)
        }
    })
}
