//! Elementwise ops: residual adds and scaling.
use crate::{Result, Tensor};

/// a + b, same shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _ = (a, b);
    unimplemented!()
}

/// a += b, same shapes.
pub fn add_inplace(a: &mut Tensor, b: &Tensor) -> Result<()> {
    let _ = (a, b);
    unimplemented!()
}

/// x · s.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    let _ = (x, s);
    unimplemented!()
}
