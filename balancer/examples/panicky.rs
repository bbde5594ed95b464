//! A test fixture, not an example to follow: an extension whose request
//! hook panics on `/boom`, so that the tests can see the balancer answer
//! that request `500`, log the extension's name, and go on serving.

use std::process::ExitCode;
use std::sync::Arc;

use balancer::extension::{Decision, Extension, HookResult, RequestView};

struct Panicky;

#[async_trait::async_trait]
impl Extension for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }

    async fn on_request(&self, req: &mut RequestView<'_>) -> HookResult<Decision> {
        if req.header.uri.path() == "/boom" {
            panic!("boom, on purpose");
        }
        Ok(Decision::Continue)
    }
}

fn main() -> ExitCode {
    balancer::cli::main_with(vec![Arc::new(Panicky)])
}
