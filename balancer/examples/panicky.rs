//! A test fixture, not an example to follow: an extension kind, `panicky`,
//! whose request hook panics on `/boom`, so that the tests can see the balancer answer
//! that request `500`, log the extension's name, and go on serving.

use std::process::ExitCode;

use balancer::extension::{Build, Decision, Extension, HookResult, Registry, RequestView};

struct Panicky;

#[async_trait::async_trait]
impl Extension for Panicky {
    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        if req.header.uri.path() == "/boom" {
            panic!("boom, on purpose");
        }
        Ok(Decision::Continue)
    }
}

fn main() -> ExitCode {
    let registry =
        Registry::new().register("panicky", |_: toml::Table, _: &mut Build<'_>| Ok(Panicky));
    balancer::cli::main_with(registry)
}
