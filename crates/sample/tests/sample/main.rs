//! Integration tests of the sample crate: one binary, a module per topic.

mod common;
mod distribution;
mod engine;
mod greedy;
mod sequences;
