//! The programs of `program_input.rs`, each run forked from this test process instead of
//! started by the launcher.

mod common;

include!("common/program_input.rs");
