//! Gradient checkpointing for candle, which has none built in (the role of
//! PyTorch's `torch.utils.checkpoint`, which transformers applies per
//! decoder layer and per vision block).
//!
//! [`checkpoint`] runs a block `y = f(x)` whose parameters are `Var`s
//! without keeping its activations: the forward computes `f(x.detach())` and
//! keeps only the output. The output joins the graph through one custom op
//! on `x`, whose backward recomputes `f` on a fresh copy of `x` with
//! tracking on, backpropagates `sum(f(x) * dy)` (whose gradient with respect
//! to the recomputed output is exactly `dy`), returns `dx` to candle's
//! backward, and adds the parameters' gradients to a side store,
//! [`CheckpointGrads`]. candle's backward can only hand gradients to an op's
//! tensor arguments (at most three), so the parameters' gradients cannot
//! travel through the op; the caller merges the store into the `GradStore`
//! of `loss.backward()` with [`CheckpointGrads::merge_into`] (which
//! `Qwen2Vl::backward` does).
//!
//! Memory: one block's activations at a time, plus each block's input and
//! output (the op's argument and result). Time: each checkpointed block's
//! forward runs twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Result, Shape, Tensor, TensorId, Var,
};

/// Parameter gradients of checkpointed blocks, filled during `backward`
/// and drained by [`CheckpointGrads::merge_into`]. Clones share one store.
#[derive(Clone, Default)]
pub struct CheckpointGrads(Arc<Mutex<HashMap<TensorId, (Tensor, Tensor)>>>);

impl std::fmt::Debug for CheckpointGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CheckpointGrads({} pending)", self.pending())
    }
}

impl CheckpointGrads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TensorId, (Tensor, Tensor)>> {
        // A panic while holding the lock leaves the map itself consistent.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Parameters with gradients waiting to be merged.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn add(&self, param: &Tensor, grad: Tensor) -> Result<()> {
        let mut map = self.lock();
        match map.get_mut(&param.id()) {
            Some((_, sum)) => *sum = (&*sum + grad)?,
            None => {
                map.insert(param.id(), (param.clone(), grad));
            }
        }
        Ok(())
    }

    /// Moves every stored gradient into `grads`, adding it to the gradient
    /// `grads` already holds for the same parameter.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<()> {
        for (_, (param, g)) in self.lock().drain() {
            let g = match grads.remove(&param) {
                Some(old) => (old + g)?,
                None => g,
            };
            grads.insert(&param, g);
        }
        Ok(())
    }
}

/// A checkpointed block's function.
type BlockFn = dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync;

/// `y = f(x)` with `f`'s activations recomputed in the backward instead of
/// kept (see the module doc). `params` must list every `Var` `f` reads:
/// their gradients go to `store`; a parameter left out gets none. Without
/// any `Var` in `params` or behind `x` nothing needs a gradient and `f`
/// simply runs.
pub fn checkpoint(
    x: &Tensor,
    params: Vec<Tensor>,
    store: &CheckpointGrads,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !x.track_op() && !params.iter().any(Tensor::track_op) {
        return f(x);
    }
    let y = f(&x.detach())?.detach();
    // The op clones the output's storage, which must then start at offset 0.
    let y = if y.is_contiguous() && y.layout().start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    // candle records an op only if an argument is tracked: with a frozen
    // input (e.g. fixed embeddings) `x` becomes a Var so that the backward,
    // and with it the parameters' gradients, still runs.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.into_inner()
    };
    let op = Recompute {
        f: Arc::new(f),
        params,
        store: store.clone(),
    };
    x.apply_op2(&y, op)
}

/// The forward of [`Recompute`]: a copy of the block's output (computed
/// outside the op), which is contiguous from offset 0 by construction.
fn clone_output<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("checkpoint: the block output must be contiguous from offset 0");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

/// The op on `(x, y)` that puts a checkpointed block into the graph.
struct Recompute {
    f: Arc<BlockFn>,
    params: Vec<Tensor>,
    store: CheckpointGrads,
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        clone_output(s, l)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        clone_output(s, l)
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        s: &MetalStorage,
        l: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        clone_output(s, l)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let x = Var::from_tensor(&x.detach())?;
        let y = (self.f)(x.as_tensor())?;
        let grads = (y * dy)?.sum_all()?.backward()?;
        for p in &self.params {
            if let Some(g) = grads.get(p) {
                self.store.add(p, g.clone())?;
            }
        }
        Ok((grads.get(x.as_tensor()).cloned(), None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::super::tests::assert_close;
    use super::*;

    fn block(w: &Tensor, b: &Tensor) -> impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static {
        let (w, b) = (w.clone(), b.clone());
        move |x: &Tensor| x.matmul(&w)?.broadcast_add(&b)?.tanh()?.matmul(&w.t()?)
    }

    /// Two applications of one block (shared weights) on a frozen input:
    /// `x` is no Var, so only the weights' gradients flow, and the store
    /// adds both applications' parts.
    #[test]
    fn frozen_input_and_shared_weights() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 4), &dev).unwrap();
        let w = Var::randn(0f32, 0.5, (4, 5), &dev).unwrap();
        let b = Var::randn(0f32, 0.5, 5, &dev).unwrap();
        let f = block(w.as_tensor(), b.as_tensor());
        let plain = f(&f(&x).unwrap()).unwrap().sqr().unwrap().sum_all().unwrap();
        let g0 = plain.backward().unwrap();

        let store = CheckpointGrads::default();
        let params = vec![w.as_tensor().clone(), b.as_tensor().clone()];
        let h = checkpoint(&x, params.clone(), &store, block(w.as_tensor(), b.as_tensor())).unwrap();
        let y = checkpoint(&h, params, &store, block(w.as_tensor(), b.as_tensor())).unwrap();
        let loss = y.sqr().unwrap().sum_all().unwrap();
        assert_close(&loss, &plain, 0.0, "loss");
        let mut g1 = loss.backward().unwrap();
        assert!(
            g1.get(w.as_tensor()).is_none(),
            "the weights' gradients wait in the store"
        );
        assert_eq!(store.pending(), 2);
        store.merge_into(&mut g1).unwrap();
        assert_eq!(store.pending(), 0);
        for (v, name) in [(&w, "w"), (&b, "b")] {
            assert_close(
                g1.get(v.as_tensor()).unwrap(),
                g0.get(v.as_tensor()).unwrap(),
                1e-6,
                name,
            );
        }
    }

    /// Nothing to differentiate: the block just runs, no op, no store entry.
    #[test]
    fn constants_only_run_plainly() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
        let (w, b) = (
            Tensor::ones((4, 5), DType::F32, &dev).unwrap(),
            Tensor::zeros(5, DType::F32, &dev).unwrap(),
        );
        let store = CheckpointGrads::default();
        let y = checkpoint(&x, vec![w.clone(), b.clone()], &store, block(&w, &b)).unwrap();
        assert!(!y.track_op());
        assert_close(&y, &block(&w, &b)(&x).unwrap(), 0.0, "output");
    }
}
