fn main() -> std::process::ExitCode {
    ferry_engine::cli::main()
}
