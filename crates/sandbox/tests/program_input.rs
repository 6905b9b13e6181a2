//! Programs run as a user runs them (`python solution.py ARGS < STDIN` beside input files),
//! each run started by the sandbox's launcher (as forgeline starts them).

mod common;

include!("common/program_input.rs");
