//! The sandbox's launcher on its own, for programs and tests that do not register their own
//! (`SandboxConfig::launcher`); forgeline itself is its own launcher.

fn main() {
    forgeline_sandbox::launcher::run_if_requested();
    eprintln!(
        "forgeline-sandbox-launch starts sandboxed Python runs for forgeline-sandbox; \
         it is not meant to be run by hand"
    );
    std::process::exit(2);
}
