//! Linear layers of the frozen model, made cheap to train through.
//!
//! candle's backward pass computes a gradient for both operands of every matmul, so a
//! plain `x · Wᵀ` inside a trained graph also computes (and keeps until the end of
//! the backward pass) a full-size gradient for the frozen weight `W`: for Llama 3 8B
//! that is one more copy of the model in memory and half the backward FLOPs, all
//! thrown away. [`forward`] runs the matmul outside the graph and attaches it with a
//! custom op whose backward gives the gradient of the input only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Shape, Storage, Tensor};

/// `linear(x)` with no gradient for the layer's weight or bias. When `x` is not part
/// of a trained graph, or the weight is itself being trained (a `Var`, as in decoder
/// pre-training), this is the plain forward pass.
pub fn forward(linear: &candle_nn::Linear, x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() || linear.weight().is_variable() {
        return linear.forward(x);
    }
    let output = linear.forward(&x.detach())?.contiguous()?;
    x.apply_op1_arc(Arc::new(Box::new(FrozenLinear {
        weight: linear.weight().clone(),
        output,
    })))
}

/// The custom op: hands out the precomputed output, and `∂L/∂x = ∂L/∂y · W` backward.
struct FrozenLinear {
    /// [out, in]
    weight: Tensor,
    /// `linear(x)`, contiguous.
    output: Tensor,
}

impl FrozenLinear {
    fn output_shape(&self) -> Shape {
        self.output.shape().clone()
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _input: &CpuStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.output.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) if layout.start_offset() == 0 => {
                Ok((cpu.clone(), self.output_shape()))
            }
            Storage::Cpu(_) => candle_core::bail!("frozen-linear: output not at offset 0"),
            _ => candle_core::bail!("frozen-linear: output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _input: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (storage, layout) = self.output.storage_and_layout();
        match &*storage {
            Storage::Cuda(cuda) => Ok((cuda.try_clone(layout)?, self.output_shape())),
            _ => candle_core::bail!("frozen-linear: output is not on the GPU"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let out_dim = self.weight.dim(0)?;
        let rows = grad_res.elem_count() / out_dim.max(1);
        let grad = grad_res
            .reshape((rows, out_dim))?
            .matmul(&self.weight.to_dtype(grad_res.dtype())?)?;
        Ok(Some(grad.reshape(arg.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    use crate::test_util::{max_abs_diff, random};

    #[test]
    fn same_output_and_input_gradient_without_a_weight_gradient() {
        let weight = random(&[5, 4], 1, 1.0, 0.0);
        let bias = random(&[5], 2, 1.0, 0.0);
        let linear = candle_nn::Linear::new(weight.clone(), Some(bias));
        let x = Var::from_tensor(&random(&[2, 3, 4], 3, 1.0, 0.0)).unwrap();
        let target = random(&[2, 3, 5], 4, 1.0, 0.0);

        let plain = linear.forward(x.as_tensor()).unwrap();
        let frozen = forward(&linear, x.as_tensor()).unwrap();
        assert!(max_abs_diff(&plain, &frozen) < 1e-6);

        let loss = |y: &Tensor| y.mul(&target).unwrap().sum_all().unwrap();
        let grads_plain = loss(&plain).backward().unwrap();
        let grads_frozen = loss(&frozen).backward().unwrap();
        let gx_plain = grads_plain.get(x.as_tensor()).unwrap();
        let gx_frozen = grads_frozen.get(x.as_tensor()).unwrap();
        assert!(max_abs_diff(gx_plain, gx_frozen) < 1e-5);
        // The plain path computed a [5, 4] gradient for the (transposed) weight and
        // kept it; the frozen one computed none.
        let weight_sized = |g: &candle_core::backprop::GradStore| {
            g.get_ids()
                .filter(|id| g.get_id(**id).is_some_and(|t| t.elem_count() == 20))
                .count()
        };
        assert_eq!(weight_sized(&grads_plain), 1);
        assert_eq!(weight_sized(&grads_frozen), 0);
    }

    #[test]
    fn outside_a_graph_it_is_the_plain_layer() {
        let linear = candle_nn::Linear::new(random(&[3, 2], 5, 1.0, 0.0), None);
        let x = Tensor::ones((4, 2), DType::F32, &Device::Cpu).unwrap();
        let y = forward(&linear, &x).unwrap();
        assert!(!y.track_op());
        assert!(max_abs_diff(&y, &linear.forward(&x).unwrap()) < 1e-7);
    }
}
