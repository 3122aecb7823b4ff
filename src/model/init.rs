//! PyTorch's default initialisations of the layers the trainer creates, drawn from
//! the crate's one seeded generator ([`crate::rng::SplitMix64`]).

use candle_core::{Device, Tensor};

use crate::rng::SplitMix64;

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
