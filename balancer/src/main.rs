//! The `balancer` command: the command line of the library with the
//! extension kinds it ships. A program with kinds of its own is the same few
//! lines (see `balancer/examples/`).

use std::process::ExitCode;

/// mimalloc: the request path allocates small, short-lived objects, which
/// glibc's malloc serves noticeably slower (see bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_transparent_huge_pages();
    balancer::cli::main_with(balancer::extension::Registry::new())
}

/// Keeps this process's memory in 4 KiB pages. mimalloc asks the kernel for
/// transparent huge pages on its arenas (built here without that request,
/// Cargo feature `no_thp`), and a kernel with THP "always" hands them out
/// unasked: a 2 MiB page is resident as soon as one byte of it is touched.
/// That doubled an idle balancer's memory (18.3 MB against 9.3 MB) and added
/// about 8 MB to the peak under load, for no measurable throughput
/// (bench/README.md).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integers and touches no memory of ours;
    // a kernel without it answers EINVAL, which leaves things as they were.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
