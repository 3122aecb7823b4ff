//! AdamW (PyTorch's `torch.optim.AdamW` update, decoupled weight decay), gradient
//! accumulation over micro-batches and global-norm clipping. The optimiser's moments
//! and step count are saved with every checkpoint so `--resume` continues exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var, backprop::GradStore};
use serde::{Deserialize, Serialize};

/// The optimiser's hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    /// PyTorch's defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
    settings: AdamWSettings,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, settings: AdamWSettings) -> candle_core::Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            params,
            m,
            v,
            steps: 0,
            settings,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with `grads` (aligned with [`Self::params`]; `None` = no gradient
    /// reached that variable, it only decays) at learning rate `lr`.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> candle_core::Result<()> {
        let s = self.settings;
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - s.beta1.powi(t);
        let bias2 = 1.0 - s.beta2.powi(t);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let decayed = var.as_tensor().affine(1.0 - lr * s.weight_decay, 0.0)?;
            let Some(g) = &grads[i] else {
                var.set(&decayed)?;
                continue;
            };
            let g = g.to_dtype(var.dtype())?;
            let m = ((&self.m[i] * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
            let v = ((&self.v[i] * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            let denom = ((&v * (1.0 / bias2))?.sqrt()? + s.eps)?;
            let update = (&m / &denom)?.affine(lr / bias1, 0.0)?;
            var.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments (`m.NAME`, `v.NAME`) to a safetensors file.
    pub fn save(&self, file: &Path) -> candle_core::Result<()> {
        let mut tensors = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.insert(format!("m.{name}"), self.m[i].clone());
            tensors.insert(format!("v.{name}"), self.v[i].clone());
        }
        candle_core::safetensors::save(&tensors, file)
    }

    /// Restores moments saved by [`Self::save`] and the step count. Every variable
    /// must have its moments in the file, with its shape.
    pub fn load(&mut self, file: &Path, steps: u64) -> candle_core::Result<()> {
        let device = self.params.first().map(|(_, v)| v.device().clone());
        let Some(device) = device else {
            self.steps = steps;
            return Ok(());
        };
        let saved = candle_core::safetensors::load(file, &device)?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{name}");
                let t = saved.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: no {key}", file.display()))
                })?;
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "{}: {key} has shape {:?}, the parameter {:?}",
                        file.display(),
                        t.dims(),
                        var.dims()
                    );
                }
                *slot = t.to_dtype(var.dtype())?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Gradients summed over the micro-batches of one optimiser step.
#[derive(Debug)]
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    pub fn new(params: usize) -> Self {
        Self {
            sums: vec![None; params],
        }
    }

    /// Adds the gradients `store` holds for `params` (in order).
    pub fn add(&mut self, params: &[(String, Var)], store: &GradStore) -> candle_core::Result<()> {
        for (i, (_, var)) in params.iter().enumerate() {
            if let Some(g) = store.get(var.as_tensor()) {
                let g = g.detach();
                self.sums[i] = Some(match self.sums[i].take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The summed gradients, clipped so their global L2 norm is at most `max_norm`
    /// (0 or less: no clipping); also returns the norm before clipping.
    pub fn finish(self, max_norm: f64) -> candle_core::Result<(Vec<Option<Tensor>>, f64)> {
        let mut squares = 0.0f64;
        for g in self.sums.iter().flatten() {
            squares += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        let norm = squares.sqrt();
        let mut grads = self.sums;
        if max_norm > 0.0 && norm > max_norm {
            // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6).
            let factor = max_norm / (norm + 1e-6);
            for g in grads.iter_mut().flatten() {
                *g = g.affine(factor, 0.0)?;
            }
        }
        Ok((grads, norm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8,
    /// weight_decay=0.01) on p = [1, -2] with gradients [0.5, 0.25] then [-1, 2].
    #[test]
    fn matches_torch_adamw() {
        let p = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], AdamWSettings::default()).unwrap();
        let g1 = Tensor::new(&[0.5f64, 0.25], &Device::Cpu).unwrap();
        opt.step(&[Some(g1)], 0.1).unwrap();
        let g2 = Tensor::new(&[-1.0f64, 2.0], &Device::Cpu).unwrap();
        opt.step(&[Some(g2)], 0.1).unwrap();
        // Expected values computed by hand from the torch update rule:
        // step 1: p = p(1 - 0.001) - 0.1 * sign(g) (Adam's first step is ±lr)
        //   → [0.899, -2.098]
        // step 2: m = 0.9 m + 0.1 g, v = 0.999 v + 0.001 g², bias-corrected.
        let expected = {
            let mut p = [1.0f64, -2.0];
            let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
            for (t, g) in [[0.5, 0.25], [-1.0, 2.0]].iter().enumerate() {
                let t = (t + 1) as i32;
                for i in 0..2 {
                    p[i] *= 1.0 - 0.1 * 0.01;
                    m[i] = 0.9 * m[i] + 0.1 * g[i];
                    v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                    let mh = m[i] / (1.0 - 0.9f64.powi(t));
                    let vh = v[i] / (1.0 - 0.999f64.powi(t));
                    p[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
                }
            }
            p
        };
        let got = p.as_tensor().to_vec1::<f64>().unwrap();
        for i in 0..2 {
            assert!(
                (got[i] - expected[i]).abs() < 1e-12,
                "{got:?} vs {expected:?}"
            );
        }
        assert!((got[0] - 0.899).abs() > 1e-3, "two steps were taken");
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], AdamWSettings::default()).unwrap();
        let g = Tensor::new(&[0.1f32, -0.2, 0.3], &Device::Cpu).unwrap();
        opt.step(&[Some(g.clone())], 0.01).unwrap();
        let file = dir.path().join("opt.safetensors");
        opt.save(&file).unwrap();

        let q = Var::from_tensor(p.as_tensor()).unwrap();
        let mut restored =
            AdamW::new(vec![("p".into(), q.clone())], AdamWSettings::default()).unwrap();
        restored.load(&file, opt.steps()).unwrap();
        opt.step(&[Some(g.clone())], 0.01).unwrap();
        restored.step(&[Some(g)], 0.01).unwrap();
        assert_eq!(
            p.as_tensor().to_vec1::<f32>().unwrap(),
            q.as_tensor().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = Var::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
        let params = vec![("a".to_string(), a.clone())];
        let loss = (a.as_tensor() * 1.0).unwrap().sum_all().unwrap();
        let mut acc = GradAccumulator::new(1);
        // Two micro-batches of gradient [1, 1] sum to [2, 2], norm √8.
        acc.add(&params, &loss.backward().unwrap()).unwrap();
        acc.add(&params, &loss.backward().unwrap()).unwrap();
        let (grads, norm) = acc.finish(1.0).unwrap();
        assert!((norm - 8f64.sqrt()).abs() < 1e-6);
        let g = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        let clipped = (g[0] * g[0] + g[1] * g[1]).sqrt();
        assert!((clipped - 1.0).abs() < 1e-5, "{g:?}");
    }
}
