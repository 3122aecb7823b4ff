//! Randomness for training: a small seeded generator (so a run is reproducible from
//! its seed and resumable from a saved state) and PyTorch's default initialisations
//! of the layers the trainer creates.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// SplitMix64: tiny, fast, and its whole state is one `u64` a checkpoint can store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }

    /// A generator for a sub-task (`seed` mixed with `stream`), independent of this one.
    pub fn derive(seed: u64, stream: u64) -> Self {
        let mut g = Self::new(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        g.next_u64();
        g
    }
}

/// PyTorch's default `nn.Linear` weight (and PEFT's `lora_A`) initialisation:
/// `kaiming_uniform_(a=√5)`, i.e. U(−1/√fan_in, 1/√fan_in), shape [out, in].
pub fn kaiming_uniform(
    out_dim: usize,
    in_dim: usize,
    rng: &mut SplitMix64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    uniform(
        &[out_dim, in_dim],
        1.0 / (in_dim as f64).sqrt(),
        rng,
        device,
    )
}

/// U(−bound, bound) in f32.
pub fn uniform(
    shape: &[usize],
    bound: f64,
    rng: &mut SplitMix64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Tensor::from_vec(data, shape, device)
}

/// Normal(0, `std`) values (Box-Muller), as `torch.nn.init.normal_`: Hugging Face's
/// Llama initialises every linear and embedding weight with std 0.02.
pub fn normal(
    shape: &[usize],
    std: f64,
    rng: &mut SplitMix64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut data: Vec<f32> = Vec::with_capacity(n + 1);
    while data.len() < n {
        let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        data.push((r * a.cos()) as f32);
        data.push((r * a.sin()) as f32);
    }
    data.truncate(n);
    Tensor::from_vec(data, shape, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_uniform() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        let xs: Vec<f64> = (0..10_000).map(|_| a.next_f64()).collect();
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_eq!(
            xs[..5],
            (0..5).map(|_| b.next_f64()).collect::<Vec<_>>()[..]
        );
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let mut items: Vec<usize> = (0..50).collect();
        a.shuffle(&mut items);
        let mut sorted = items.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(items, sorted);
    }

    #[test]
    fn kaiming_bound() {
        let mut rng = SplitMix64::new(1);
        let w = kaiming_uniform(8, 16, &mut rng, &Device::Cpu).unwrap();
        let max = w
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max <= 0.25 && max > 0.2, "{max}");
    }

    #[test]
    fn normal_has_the_asked_spread() {
        let t = normal(&[100, 100], 0.02, &mut SplitMix64::new(3), &Device::Cpu).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "{}", var.sqrt());
    }
}
