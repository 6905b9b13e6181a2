//! Hostile programs, each run started by the sandbox's launcher (as forgeline starts them).
//! After each, the host is unharmed (nothing left running, nothing changed outside the run's
//! directory) and the next run works.

mod common;

include!("common/hostile.rs");
