//! `req` and `resp`: one userdata of each per state, made with the state,
//! through which a hook reads the request or the response the balancer
//! lends it for one call (and writes its headers). Nothing is made for a
//! call but what the script reads: a field becomes a Lua value when it is
//! read, `ctx` a table when it is first used. Outside the call it was lent
//! for, `req` (or `resp`) refuses to be read.
//!
//! Fields the script assigns (`req.user = ...`) are kept for the call, as
//! they were when `req` was a plain table: they shadow the request's own,
//! and change nothing of it.

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::rc::Rc;

use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataMethods, Value};

use super::marshal::{self, Headed};
use crate::extension::{RequestView, ResponseView};
use crate::telemetry::text::IpText;

/// A view (a [`RequestView`] or a [`ResponseView`]) lent for one call.
pub struct Lent<V> {
    /// The view of the call under way; `None` between calls.
    ///
    /// Set only by [`Lent::lend`], whose [`Loan`] borrows the view mutably
    /// and clears this when it ends: the pointer is never read after the
    /// view's lifetime. It is read only by this module's callbacks, which
    /// Lua runs on the state's one thread, one at a time, and which run no
    /// script code while they hold it (a finalizer could, but the sandbox
    /// refuses `__gc`): no two references to the view are alive at once.
    at: Cell<Option<NonNull<V>>>,
    /// `ctx` of this call, once read (or restored for `resp`).
    ctx: RefCell<Option<Table>>,
    /// Fields the script assigned during this call.
    own: RefCell<Option<Table>>,
    /// `req` or `resp`, for errors.
    name: &'static str,
}

/// A lending of a view; it ends when this is dropped.
pub struct Loan<'a, V> {
    lent: &'a Lent<V>,
}

impl<V> Drop for Loan<'_, V> {
    fn drop(&mut self) {
        self.lent.at.set(None);
        self.lent.ctx.take();
        self.lent.own.take();
    }
}

impl<V> Loan<'_, V> {
    /// The call's `ctx`, if the script used it.
    pub fn ctx(&self) -> Option<Table> {
        self.lent.ctx.borrow().clone()
    }
}

impl<V> Lent<V> {
    fn new(name: &'static str) -> Self {
        Lent {
            at: Cell::new(None),
            ctx: RefCell::new(None),
            own: RefCell::new(None),
            name,
        }
    }

    /// The view lent now, or the error a script gets for using `req` (or
    /// `resp`) outside its call.
    fn lent_now(&self) -> mlua::Result<NonNull<V>> {
        self.at.get().ok_or_else(|| {
            mlua::Error::runtime(format!(
                "{} is used outside the call it was given to (keep what you need from it in a variable instead)",
                self.name
            ))
        })
    }

    /// Runs `read` on the view lent now.
    fn with<R>(&self, read: impl FnOnce(&mut V) -> mlua::Result<R>) -> mlua::Result<R> {
        let mut at = self.lent_now()?;
        // SAFETY: see `at`: lent (hence alive and not otherwise borrowed)
        // while it is set, and this is the only reference made from it now.
        read(unsafe { at.as_mut() })
    }

    /// `ctx`, made empty on first use.
    fn ctx(&self, lua: &Lua) -> mlua::Result<Table> {
        let mut ctx = self.ctx.borrow_mut();
        match &*ctx {
            Some(table) => Ok(table.clone()),
            None => {
                let table = lua.create_table()?;
                *ctx = Some(table.clone());
                Ok(table)
            }
        }
    }

    /// A field the script assigned during this call, if any.
    fn own(&self, key: &Value) -> mlua::Result<Value> {
        match &*self.own.borrow() {
            Some(own) => own.raw_get(key),
            None => Ok(Value::Nil),
        }
    }

    fn set_own(&self, lua: &Lua, key: Value, value: Value) -> mlua::Result<()> {
        let mut own = self.own.borrow_mut();
        if own.is_none() {
            *own = Some(lua.create_table()?);
        }
        own.as_ref().map_or(Ok(()), |t| t.raw_set(key, value))
    }
}

/// The views whose headers a script reads and writes.
pub trait Viewed: 'static {
    type Header: Headed;
    fn header(&mut self) -> &mut Self::Header;
}

impl Viewed for RequestView<'static> {
    type Header = pingora::http::RequestHeader;
    fn header(&mut self) -> &mut Self::Header {
        self.header
    }
}

impl Viewed for ResponseView<'static> {
    type Header = pingora::http::ResponseHeader;
    fn header(&mut self) -> &mut Self::Header {
        self.header
    }
}

/// `req.headers` and `resp.headers`.
struct Headers<V>(Rc<Lent<V>>);

impl<V: Viewed> UserData for Headers<V> {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, this, name: Value| {
            this.0
                .with(|view| marshal::header(lua, view.header().map(), &name))
        });
        methods.add_meta_method(
            MetaMethod::NewIndex,
            |_, this, (name, value): (mlua::String, Value)| {
                this.0
                    .with(|view| marshal::set_header(view.header(), &name, value))
            },
        );
        methods.add_meta_method(MetaMethod::Pairs, |lua, this, ()| {
            this.0
                .with(|view| marshal::all_headers(lua, view.header().map()))
        });
    }
}

/// One of `req` and `resp`: its view, and its `headers`.
struct Handle<V> {
    lent: Rc<Lent<V>>,
    headers: AnyUserData,
}

/// A field of `req` or `resp`, as Lua sees it.
pub trait Fields: Viewed + Sized {
    /// The names of the fields (all of them, `headers` and `ctx` included).
    const NAMES: &'static [&'static str];
    /// Field `name` of the view, but `headers` and `ctx`; `nil` if none.
    fn field(&mut self, lua: &Lua, name: &[u8]) -> mlua::Result<Value>;
}

impl Fields for RequestView<'static> {
    const NAMES: &'static [&'static str] = &[
        "method",
        "path",
        "query",
        "host",
        "client_ip",
        "route",
        "group",
        "request_id",
        "headers",
        "ctx",
    ];

    fn field(&mut self, lua: &Lua, name: &[u8]) -> mlua::Result<Value> {
        let text = |s: &str| lua.create_string(s).map(Value::String);
        let maybe = |s: Option<&str>| s.map_or(Ok(Value::Nil), text);
        match name {
            b"method" => text(self.header.method.as_str()),
            b"path" => text(self.header.uri.path()),
            b"query" => maybe(self.header.uri.query()),
            b"host" => maybe(Some(self.host).filter(|h| !h.is_empty())),
            b"client_ip" => match self.client_ip {
                Some(ip) => text(IpText::new(ip).as_str()),
                None => Ok(Value::Nil),
            },
            b"route" => maybe(self.route),
            b"group" => maybe(self.upstream),
            b"request_id" => text(self.request_id),
            _ => Ok(Value::Nil),
        }
    }
}

impl Fields for ResponseView<'static> {
    const NAMES: &'static [&'static str] = &["status", "headers", "ctx"];

    fn field(&mut self, _: &Lua, name: &[u8]) -> mlua::Result<Value> {
        Ok(match name {
            b"status" => Value::Integer(i64::from(self.header.status.as_u16())),
            _ => Value::Nil,
        })
    }
}

impl<V: Fields> Handle<V> {
    fn get(&self, lua: &Lua, key: Value) -> mlua::Result<Value> {
        let own = self.lent.own(&key)?;
        if !own.is_nil() {
            return Ok(own);
        }
        let Value::String(name) = key else {
            return Ok(Value::Nil);
        };
        match &*name.as_bytes() {
            b"headers" => Ok(Value::UserData(self.headers.clone())),
            b"ctx" => {
                // Checked like any field: only during the call.
                self.lent.lent_now()?;
                self.lent.ctx(lua).map(Value::Table)
            }
            other => self.lent.with(|view| view.field(lua, other)),
        }
    }
}

impl<V: Fields> UserData for Handle<V> {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::Index, |lua, this, key: Value| {
            this.get(lua, key)
        });
        methods.add_meta_method(
            MetaMethod::NewIndex,
            |lua, this, (key, value): (Value, Value)| {
                this.lent.lent_now()?;
                this.lent.set_own(lua, key, value)
            },
        );
        methods.add_meta_method(MetaMethod::Pairs, |lua, this, ()| {
            let all = lua.create_table()?;
            for name in V::NAMES {
                all.raw_set(
                    *name,
                    this.get(lua, Value::String(lua.create_string(name)?))?,
                )?;
            }
            if let Some(own) = &*this.lent.own.borrow() {
                for pair in own.pairs::<Value, Value>() {
                    let (key, value) = pair?;
                    all.raw_set(key, value)?;
                }
            }
            let next: mlua::Function = lua.globals().raw_get("next")?;
            Ok((next, all, Value::Nil))
        });
    }
}

/// A state's `req` or `resp`: what the balancer lends views through.
pub struct Lender<V> {
    lent: Rc<Lent<V>>,
    handle: AnyUserData,
}

impl<V: Fields> Lender<V> {
    fn new(lua: &Lua, name: &'static str) -> mlua::Result<Self> {
        let lent = Rc::new(Lent::new(name));
        let headers = lua.create_userdata(Headers(Rc::clone(&lent)))?;
        let handle = lua.create_userdata(Handle {
            lent: Rc::clone(&lent),
            headers,
        })?;
        Ok(Lender { lent, handle })
    }

    /// The userdata a hook is called with.
    pub fn handle(&self) -> &AnyUserData {
        &self.handle
    }
}

impl Lender<RequestView<'static>> {
    /// `req` of `lua`.
    pub fn request(lua: &Lua) -> mlua::Result<Self> {
        Lender::new(lua, "req")
    }

    /// Lends `view` until the loan is dropped.
    pub fn lend<'a>(&'a self, view: &'a mut RequestView<'_>) -> Loan<'a, RequestView<'static>> {
        // Only the lifetime is erased: see `Lent::at`.
        self.lent.at.set(Some(NonNull::from(view).cast()));
        Loan { lent: &self.lent }
    }
}

impl Lender<ResponseView<'static>> {
    /// `resp` of `lua`.
    pub fn response(lua: &Lua) -> mlua::Result<Self> {
        Lender::new(lua, "resp")
    }

    /// Lends `view`, with `ctx` as `resp.ctx` (made empty when first used if
    /// `None`), until the loan is dropped.
    pub fn lend<'a>(
        &'a self,
        view: &'a mut ResponseView<'_>,
        ctx: Option<Table>,
    ) -> Loan<'a, ResponseView<'static>> {
        self.lent.at.set(Some(NonNull::from(view).cast()));
        *self.lent.ctx.borrow_mut() = ctx;
        Loan { lent: &self.lent }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::http::RequestHeader;

    fn call(lua: &Lua, source: &str, req: &Lender<RequestView<'static>>) -> mlua::Result<Value> {
        lua.load(source).into_function()?.call(req.handle())
    }

    #[test]
    fn req_reads_the_request_lent_now_keeps_what_the_script_assigns_and_refuses_use_after() {
        let lua = Lua::new();
        let req = Lender::request(&lua).unwrap();
        let mut header = RequestHeader::build("GET", b"/a?b=1", None).unwrap();
        header.insert_header("user-agent", "test").unwrap();
        let mut memo = http::Extensions::new();
        let mut view = RequestView {
            header: &mut header,
            memo: &mut memo,
            client_ip: Some("10.1.2.3".parse().unwrap()),
            host: "",
            route: Some("app"),
            upstream: None,
            request_id: "id-1",
        };
        let got = {
            let loan = req.lend(&mut view);
            let got = call(
                &lua,
                r#"local req = ...
                kept = req
                req.path = "/changed"
                req.note = "mine"
                req.headers["x-set"] = req.headers["user-agent"] .. "!"
                req.ctx.seen = true
                local names = {}
                for k in pairs(req) do names[#names + 1] = k end
                table.sort(names)
                return table.concat({ req.method, req.path, req.note, tostring(req.host),
                  req.client_ip, req.route, tostring(req.group), req.request_id,
                  tostring(req.query == "b=1") }, " ") .. " | " .. table.concat(names, ",")"#,
                &req,
            )
            .unwrap();
            let ctx = loan.ctx().expect("ctx was used");
            assert!(ctx.get::<bool>("seen").unwrap());
            got
        };
        assert_eq!(
            got.to_string().unwrap(),
            "GET /changed mine nil 10.1.2.3 app nil id-1 true | \
             client_ip,ctx,headers,method,note,path,query,request_id,route"
        );
        assert_eq!(view.header.uri.path(), "/a", "an assigned field is a copy");
        assert_eq!(
            view.header.headers.get("x-set").map(|v| v.as_bytes()),
            Some(&b"test!"[..]),
            "headers write through"
        );

        // The loan is over: what the script kept refuses to be read, and
        // what it assigned is gone with the call.
        let after = lua.load("return kept.path").eval::<Value>().unwrap_err();
        assert!(
            after
                .to_string()
                .contains("req is used outside the call it was given to"),
            "{after}"
        );
        let mut header = RequestHeader::build("POST", b"/next", None).unwrap();
        let mut view = RequestView {
            header: &mut header,
            memo: &mut memo,
            client_ip: None,
            host: "h",
            route: None,
            upstream: Some("default"),
            request_id: "id-2",
        };
        let _loan = req.lend(&mut view);
        let got = call(
            &lua,
            "local req = ... return tostring(req.note) .. ' ' .. req.path .. ' ' .. tostring(rawequal(req, kept))",
            &req,
        )
        .unwrap();
        assert_eq!(got.to_string().unwrap(), "nil /next true");
    }
}
