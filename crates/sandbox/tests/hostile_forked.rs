//! The hostile programs of `hostile.rs`, each run forked from this test process instead of
//! started by the launcher (the default of a program that registered no launcher).

mod common;

include!("common/hostile.rs");
