//! Integration tests of the sample crate: one binary, a module per topic.

mod common;
mod distribution;
mod engine;
mod fixture_greedy;
mod greedy;
mod sequences;
