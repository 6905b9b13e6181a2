fn main() -> std::process::ExitCode {
    forgeline_cli::main()
}
