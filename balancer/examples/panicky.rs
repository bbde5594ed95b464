//! A test fixture, not an example to follow: an extension kind, `panicky`,
//! whose request hook panics on `/boom`, so that the tests can see the balancer answer
//! that request `500`, log the extension's name, and go on serving; and whose
//! response hook turns a backend's `101` into a `403` when the request has
//! `Fixture-Refuse: upgrade`, so that they can see the client get that `403`
//! and no tunnel (and, with `Fixture-Refuse: fake-switch`, any other status
//! into a `101` the backend never sent; with `interim`, the `101` into a
//! `102`).

use std::process::ExitCode;

use balancer::extension::{
    Build, Decision, Extension, HookResult, Registry, RequestView, ResponseView,
};

struct Panicky;

#[async_trait::async_trait]
impl Extension for Panicky {
    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        if req.header.uri.path() == "/boom" {
            panic!("boom, on purpose");
        }
        Ok(Decision::Continue)
    }

    async fn on_response(&self, resp: &mut ResponseView<'_>) -> HookResult<()> {
        let switched = resp.header.status == http::StatusCode::SWITCHING_PROTOCOLS;
        match resp.request.headers.get("fixture-refuse") {
            Some(v) if v == "upgrade" && switched => resp.header.set_status(403)?,
            Some(v) if v == "fake-switch" && !switched => resp.header.set_status(101)?,
            Some(v) if v == "interim" && switched => resp.header.set_status(102)?,
            _ => {}
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let registry =
        Registry::new().register("panicky", |_: toml::Table, _: &mut Build<'_>| Ok(Panicky));
    balancer::cli::main_with(registry)
}
