//! `corral bench` with a counting allocator: the same code as the subcommand
//! (included from src/cmd/bench.rs), reporting heap allocations per I/O on the
//! load generator's thread, to show the I/O path allocates nothing.
//!
//! ```text
//! cargo run --release -p corral --example bench -- -q 32 -o 4k -w randread -t 5
//! ```

#![allow(dead_code)]

#[path = "../src/cmd/bench.rs"]
mod bench;

use clap::Parser;

struct CountingAlloc;

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards every call to the system allocator; only counts them.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: bench::Args,
}

fn main() -> std::process::ExitCode {
    bench::set_alloc_counter(|| ALLOCS.with(|c| c.get()));
    match bench::run(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corral bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
