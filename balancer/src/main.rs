//! The `balancer` command: the command line of the library with no
//! extensions. A program with extensions of its own is the same few lines
//! (see `balancer/examples/`).

use std::process::ExitCode;

/// mimalloc: the request path allocates small, short-lived objects, which
/// glibc's malloc serves noticeably slower (see bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    balancer::cli::main_with(Vec::new())
}
