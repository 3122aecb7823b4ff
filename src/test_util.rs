//! Helpers for the unit tests of the library's modules.

use candle_core::{DType, Device, Tensor};

/// Deterministic pseudo-random values in [offset - scale/2, offset + scale/2)
/// without a RNG crate.
pub fn random(shape: &[usize], seed: u64, scale: f32, offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            offset + scale * (((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Maximum absolute difference of two same-shaped tensors, in f32.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// A small file at `path` (its folders made), standing for an audio file.
pub fn touch(path: &std::path::Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"RIFF").unwrap();
}
