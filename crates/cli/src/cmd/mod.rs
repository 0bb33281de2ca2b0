//! One module per subcommand.
pub mod kernels;
pub mod pairs;
pub mod push;
pub mod sample;
pub mod score;
pub mod train;
