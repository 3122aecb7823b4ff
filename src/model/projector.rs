//! The projector between the audio encoder and the language model, and the pooling
//! that turns a clip's patches into the embedding(s) spliced into the prompt.
//!
//! `Linear(0) → GELU (erf) → Linear(2)` applied to every encoder patch (the key names
//! `0.*` and `2.*` are those of a PyTorch `nn.Sequential`), then pooled. The paper
//! uses global mean pooling: one audio embedding per clip.

use std::path::Path;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::Linear;
use serde::{Deserialize, Serialize};

use super::weights::{LoadError, Result, Weights};

/// How projected patches become the audio embeddings the decoder sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over valid (non-padded) patches: one embedding per clip.
    #[default]
    Mean,
}

impl Pooling {
    /// Number of audio embeddings a clip contributes to the prompt.
    pub fn tokens_per_clip(self) -> usize {
        match self {
            Pooling::Mean => 1,
        }
    }
}

impl std::fmt::Display for Pooling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pooling::Mean => f.write_str("mean"),
        }
    }
}

/// `Linear → GELU → Linear`, then pooling.
#[derive(Debug, Clone)]
pub struct Projector {
    fc1: Linear,
    fc2: Linear,
    in_dim: usize,
    out_dim: usize,
    pooling: Pooling,
}

impl Projector {
    /// Loads a projector from a safetensors file with keys `0.weight` [H, D],
    /// `0.bias` [H], `2.weight` [O, H], `2.bias` [O]; dimensions come from the file.
    pub fn load(path: &Path, pooling: Pooling, dtype: DType, device: &Device) -> Result<Self> {
        let w = Weights::from_safetensors(path, &[path.to_path_buf()], dtype, device)?;
        Self::from_weights(&w, pooling)
    }

    pub fn from_weights(w: &Weights, pooling: Pooling) -> Result<Self> {
        let first = w.pp("0").get_any_shape("weight")?;
        let [hidden, in_dim] = first.dims() else {
            return Err(LoadError::Shape {
                file: w.origin().to_path_buf(),
                name: w.pp("0").full_name("weight"),
                actual: first.dims().to_vec(),
                expected: vec![0, 0],
            });
        };
        let (hidden, in_dim) = (*hidden, *in_dim);
        let second = w.pp("2").get_any_shape("weight")?;
        let out_dim = second.dims().first().copied().unwrap_or(0);
        Ok(Self {
            fc1: w.pp("0").linear(in_dim, hidden, true)?,
            fc2: w.pp("2").linear(hidden, out_dim, true)?,
            in_dim,
            out_dim,
            pooling,
        })
    }

    /// Encoder feature size the projector expects.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Embedding size it produces (the decoder's hidden size).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Per-patch projection: [B, P, D] → [B, P, O].
    pub fn project(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(features)?.gelu_erf()?)
    }

    /// Pooling of projected patches [B, P, O] with an optional padding mask [B, P]
    /// (nonzero = padding) → audio embeddings [B, tokens_per_clip, O].
    pub fn pool(
        &self,
        projected: &Tensor,
        padding_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match self.pooling {
            Pooling::Mean => match padding_mask {
                None => projected.mean_keepdim(1),
                Some(mask) => {
                    let valid = mask
                        .eq(0u8)?
                        .to_dtype(projected.dtype())?
                        .unsqueeze(D::Minus1)?; // [B, P, 1]
                    let sum = projected.broadcast_mul(&valid)?.sum_keepdim(1)?;
                    // A clip with no valid patch cannot be pooled; the encoder rejects
                    // such inputs before this point, the clamp only avoids NaN.
                    let count = valid.sum_keepdim(1)?.clamp(1.0, f64::INFINITY)?;
                    sum.broadcast_div(&count)
                }
            },
        }
    }

    /// `project` then `pool`.
    pub fn forward(
        &self,
        features: &Tensor,
        padding_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.pool(&self.project(features)?, padding_mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn projector() -> Projector {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert(
            "0.weight".into(),
            Tensor::new(&[[1f32, 0.], [0., 2.], [1., 1.]], &dev).unwrap(),
        );
        t.insert(
            "0.bias".into(),
            Tensor::new(&[0f32, 0., -1.], &dev).unwrap(),
        );
        t.insert(
            "2.weight".into(),
            Tensor::new(&[[1f32, 1., 1.]], &dev).unwrap(),
        );
        t.insert("2.bias".into(), Tensor::new(&[0.5f32], &dev).unwrap());
        Projector::from_weights(
            &Weights::from_tensors("p.safetensors", t, DType::F32, &dev),
            Pooling::Mean,
        )
        .unwrap()
    }

    #[test]
    fn dims_come_from_the_file() {
        let p = projector();
        assert_eq!((p.in_dim(), p.out_dim()), (2, 1));
    }

    #[test]
    fn mean_pooling_ignores_padded_patches() {
        let p = projector();
        let x = Tensor::new(&[[[1f32, 1.], [2., 0.], [100., 100.]]], &Device::Cpu).unwrap();
        let gelu = |v: f64| 0.5 * v * (1.0 + libm_erf(v / 2f64.sqrt()));
        // patch (1,1): fc1 = [1, 2, 1] → gelu → sum + 0.5 ; patch (2,0): [2, 0, 1]
        let y0 = gelu(1.0) + gelu(2.0) + gelu(1.0) + 0.5;
        let y1 = gelu(2.0) + gelu(0.0) + gelu(1.0) + 0.5;
        let mask = Tensor::new(&[[0u8, 0, 1]], &Device::Cpu).unwrap();
        let pooled = p
            .forward(&x, Some(&mask))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (pooled[0] as f64 - (y0 + y1) / 2.0).abs() < 1e-5,
            "{pooled:?}"
        );
        let unmasked = p
            .forward(&x, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(unmasked[0] > 50.0);
    }

    /// erf by its series, precise enough for the test values.
    fn libm_erf(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..60 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
