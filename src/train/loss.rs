//! The caption loss: cross-entropy of logits [N, V] (V = 128,256 for Llama 3)
//! against label ids, summed over the N caption tokens.
//!
//! Built from candle ops, `log_softmax` + `gather` allocate about ten [N, V]
//! temporaries per step (forward and backward), which on the CPU costs more in page
//! faults than the arithmetic. On the CPU the loss is one fused op instead: the
//! forward keeps only a log-sum-exp per row, the backward writes the one [N, V]
//! gradient `softmax − one_hot` directly. Other devices use the composite ops.

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Storage, Tensor};

/// `Σᵢ −log softmax(logitsᵢ)[labelᵢ]`: a scalar in the logits' dtype.
pub fn cross_entropy_sum(logits: &Tensor, labels: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if labels.dims() != [rows] {
        candle_core::bail!("{rows} rows of logits but labels {:?}", labels.dims());
    }
    if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let per_row = logits.contiguous()?.apply_op1(FusedCrossEntropy {
            labels,
            log_sum_exp: std::sync::Mutex::new(Vec::new()),
        })?;
        return per_row.sum_all();
    }
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    log_probs.gather(&labels.unsqueeze(1)?, 1)?.sum_all()?.neg()
}

/// Per-row cross-entropy [N] of contiguous logits [N, V].
struct FusedCrossEntropy {
    labels: Vec<u32>,
    /// Each row's log-sum-exp from the forward pass, for the backward pass.
    log_sum_exp: std::sync::Mutex<Vec<f64>>,
}

/// Threads the rows are split over.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

trait Float: Copy + Send + Sync + PartialOrd + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// `exp(self − shift)` in the type's own precision (f32's `exp` is several times
    /// cheaper than f64's, and this runs 2·N·V times a step).
    fn exp_minus(self, shift: f64) -> f64;
}

impl Float for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn exp_minus(self, shift: f64) -> f64 {
        f64::from((self - shift as f32).exp())
    }
}

impl Float for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn exp_minus(self, shift: f64) -> f64 {
        (self - shift).exp()
    }
}

/// log Σ exp(row), computed stably.
fn log_sum_exp<T: Float>(row: &[T]) -> f64 {
    let max = row
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = row.iter().map(|v| v.exp_minus(max)).sum();
    max + sum.ln()
}

impl FusedCrossEntropy {
    fn check(&self, rows: usize, vocab: usize) -> candle_core::Result<()> {
        if self.labels.len() != rows {
            candle_core::bail!("{} labels for {rows} rows", self.labels.len());
        }
        if let Some(bad) = self.labels.iter().find(|&&l| l as usize >= vocab) {
            candle_core::bail!("label {bad} outside the vocabulary of {vocab}");
        }
        Ok(())
    }

    /// Per-row losses and log-sum-exps.
    fn forward<T: Float>(&self, data: &[T], vocab: usize) -> (Vec<T>, Vec<f64>) {
        let rows = self.labels.len();
        let mut lse = vec![0.0f64; rows];
        let chunk = rows.div_ceil(threads()).max(1);
        std::thread::scope(|s| {
            for (part, lse) in lse.chunks_mut(chunk).enumerate() {
                s.spawn(move || {
                    for (k, l) in lse.iter_mut().enumerate() {
                        let r = part * chunk + k;
                        *l = log_sum_exp(&data[r * vocab..(r + 1) * vocab]);
                    }
                });
            }
        });
        let losses = (0..rows)
            .map(|r| T::from_f64(lse[r] - data[r * vocab + self.labels[r] as usize].to_f64()))
            .collect();
        (losses, lse)
    }

    /// `(softmax(row) − one_hot(label)) · g_row`.
    fn backward<T: Float>(
        &self,
        data: &[T],
        vocab: usize,
        lse: &[f64],
        grad_rows: &[f64],
    ) -> Vec<T> {
        let mut out = vec![T::from_f64(0.0); data.len()];
        let chunk_rows = self.labels.len().div_ceil(threads()).max(1);
        std::thread::scope(|s| {
            for (part, out) in out.chunks_mut(chunk_rows * vocab).enumerate() {
                s.spawn(move || {
                    for (k, out_row) in out.chunks_mut(vocab).enumerate() {
                        let r = part * chunk_rows + k;
                        let row = &data[r * vocab..(r + 1) * vocab];
                        let g = grad_rows[r];
                        for (o, v) in out_row.iter_mut().zip(row) {
                            *o = T::from_f64(v.exp_minus(lse[r]) * g);
                        }
                        let label = self.labels[r] as usize;
                        out_row[label] = T::from_f64(out_row[label].to_f64() - g);
                    }
                });
            }
        });
        out
    }
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        self.check(rows, vocab)?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused-cross-entropy needs contiguous logits");
        };
        let (out, lse) = match storage {
            CpuStorage::F32(v) => {
                let (losses, lse) = self.forward(&v[start..end], vocab);
                (CpuStorage::F32(losses), lse)
            }
            CpuStorage::F64(v) => {
                let (losses, lse) = self.forward(&v[start..end], vocab);
                (CpuStorage::F64(losses), lse)
            }
            _ => candle_core::bail!("fused-cross-entropy takes f32 or f64 logits"),
        };
        *self.log_sum_exp.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, vocab) = arg.dims2()?;
        let grad_rows = grad_res.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let lse = self
            .log_sum_exp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if lse.len() != rows {
            candle_core::bail!("fused-cross-entropy: backward without its forward pass");
        }
        let arg = arg.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused-cross-entropy needs contiguous logits");
        };
        // Read in place: the logits are the largest tensor of the step.
        let grad = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => Tensor::from_vec(
                self.backward(&v[start..end], vocab, &lse, &grad_rows),
                (rows, vocab),
                arg.device(),
            )?,
            Storage::Cpu(CpuStorage::F64(v)) => Tensor::from_vec(
                self.backward(&v[start..end], vocab, &lse, &grad_rows),
                (rows, vocab),
                arg.device(),
            )?,
            _ => candle_core::bail!("fused-cross-entropy takes f32 or f64 logits on the CPU"),
        };
        Ok(Some(grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    use crate::test_util::{max_abs_diff, random};

    #[test]
    fn fused_equals_the_composite_ops_forward_and_backward() {
        let logits = Var::from_tensor(&random(&[5, 1000], 3, 20.0, 0.0)).unwrap();
        let labels = Tensor::new(&[0u32, 999, 17, 500, 3], &Device::Cpu).unwrap();
        let fused = cross_entropy_sum(logits.as_tensor(), &labels).unwrap();
        let composite = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&labels.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let (a, b) = (
            fused.to_scalar::<f32>().unwrap(),
            composite.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-3 * b.abs(), "{a} vs {b}");
        // Scaled, so the incoming gradient is not 1.
        let gf = (fused * 0.5).unwrap().backward().unwrap();
        let gc = (composite * 0.5).unwrap().backward().unwrap();
        let (gf, gc) = (
            gf.get(logits.as_tensor()).unwrap(),
            gc.get(logits.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(gf, gc) < 1e-6, "{}", max_abs_diff(gf, gc));
    }

    #[test]
    fn bad_labels_are_errors() {
        let logits = random(&[2, 10], 1, 1.0, 0.0);
        let labels = Tensor::new(&[1u32, 10], &Device::Cpu).unwrap();
        assert!(cross_entropy_sum(&logits, &labels).is_err());
        let labels = Tensor::new(&[1u32], &Device::Cpu).unwrap();
        assert!(cross_entropy_sum(&logits, &labels).is_err());
    }
}
