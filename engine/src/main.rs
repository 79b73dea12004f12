//! The `ferry` binary: the command line of `ferry_engine::cli`, nothing else.
//!
//! What it does: hands the process to [`ferry_engine::cli::main`], whose exit code it returns.
//!
//! What it does not: hold any logic, so every command can be run and tested as a library call.
//!
//! Invariants: the exit code is the command's (0 on success, non-zero with a message on stderr).

fn main() -> std::process::ExitCode {
    ferry_engine::cli::main()
}
