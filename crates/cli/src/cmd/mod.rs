//! One module per subcommand.
pub mod export;
pub mod kernels;
pub mod pairs;
pub mod push;
pub mod run;
pub mod sample;
pub mod score;
pub mod train;
