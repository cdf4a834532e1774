//! The optimizer: AdamW whose moments are kept by variable name, so a
//! checkpoint can save and restore them ([`crate::train::checkpoint`]).

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{ParamsAdamW, VarMap};

/// One optimized variable, its moments (f32) and, for a variable of a
/// narrower dtype with master weights on, its f32 master copy.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) m: Tensor,
    pub(crate) v: Tensor,
    pub(crate) master: Option<Tensor>,
}

/// AdamW (decoupled weight decay, bias-corrected moments) over the named variables of a
/// [`VarMap`], with state that can be saved and restored.
///
/// The update is exactly `candle_nn::AdamW`'s (same operations in the same order, so the
/// same numbers for f32 variables): at step `t`, for each variable `θ` with gradient `g`,
/// `m = β1·m + (1-β1)·g`, `v = β2·v + (1-β2)·g²`,
/// `θ = θ·(1 - lr·λ) - lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)`.
/// Unlike candle's optimizer, the moments are kept by variable name, so
/// [`crate::train::checkpoint`] can write them to and read them from a checkpoint. Only floating-point variables are
/// optimized; variables without a gradient are left alone (their moments too), but every
/// call to [`AdamW::step`] advances the step count.
///
/// **Mixed precision.** The moments are f32 whatever the variable's dtype
/// (bf16 weights: the gradient is widened to f32 for the update), as
/// PyTorch's AdamW keeps fp32 states under bf16 autocast and DeepSpeed and
/// FSDP keep them. With master weights, each bf16 (or f16) variable also
/// has an f32 copy that the update is applied to and that is rounded into
/// the variable after each step, as DeepSpeed's and FSDP's mixed precision
/// do: without it, an update below half a bf16 ulp of the weight (2^-9
/// relative; R1-SGG's GRPO learning rate of 6e-7 moves most weights by far
/// less) is rounded away and the weight never moves. Per parameter: bf16
/// weight 2 B + bf16 gradient 2 B + f32 moments 8 B = 12 B, and 16 B with
/// master weights (f32 weights: 4 + 4 + 8 = 16 B, no master copy needed).
#[derive(Debug)]
pub struct AdamW {
    /// Sorted by name.
    pub(crate) slots: Vec<Slot>,
    pub(crate) step_t: usize,
    pub(crate) params: ParamsAdamW,
}

impl AdamW {
    /// An optimizer over the floating-point variables of `vars` whose name
    /// `trainable` accepts (as they are now: variables added to the map
    /// later are not optimized), with zero moments and step count 0, and
    /// f32 master copies of the non-f32 ones when `master_weights`.
    pub fn new(
        vars: &VarMap,
        params: ParamsAdamW,
        trainable: impl Fn(&str) -> bool,
        master_weights: bool,
    ) -> Result<Self> {
        let data = vars.data().lock().expect("VarMap lock poisoned");
        let mut slots = data
            .iter()
            .filter(|(name, var)| var.dtype().is_float() && trainable(name))
            .map(|(name, var)| {
                let zeros = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                let master = (master_weights && var.dtype() != DType::F32)
                    .then(|| var.as_tensor().to_dtype(DType::F32))
                    .transpose()?;
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    m: zeros.clone(),
                    v: zeros,
                    master,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        slots.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            slots,
            step_t: 0,
            params,
        })
    }

    /// The optimized variables, sorted by name.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// One AdamW update of every variable that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let ParamsAdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let lr_lambda = lr * weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for slot in self.slots.iter_mut() {
            let theta = &slot.var;
            let Some(g) = grads.get(theta) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let next_m = ((&slot.m * beta1)? + (&g * (1.0 - beta1))?)?;
            let next_v = ((&slot.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let current = match &slot.master {
                Some(master) => master.clone(),
                None => theta.as_tensor().to_dtype(DType::F32)?,
            };
            let next_theta = (current * (1f64 - lr_lambda))?;
            let adjusted_grad = (m_hat / (v_hat.sqrt()? + eps)?)?;
            let next_theta = (next_theta - (adjusted_grad * lr)?)?;
            slot.m = next_m;
            slot.v = next_v;
            theta.set(&next_theta.to_dtype(theta.dtype())?)?;
            if slot.master.is_some() {
                slot.master = Some(next_theta);
            }
        }
        Ok(())
    }

    /// Sets the learning rate of the next steps (for a schedule).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }

    /// Number of steps taken (the `t` of the bias correction).
    #[cfg(test)]
    pub fn step_count(&self) -> usize {
        self.step_t
    }

    /// Names of the optimized variables, sorted.
    #[cfg(test)]
    pub fn var_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Bytes of optimizer state (moments and master weights).
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| (2 + usize::from(s.master.is_some())) * 4 * s.var.elem_count())
            .sum()
    }

    /// First and second moments of the variable `name`, if it is optimized.
    #[cfg(test)]
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.slot_index(name)
            .map(|i| (&self.slots[i].m, &self.slots[i].v))
    }

    pub(crate) fn slot_index(&self, name: &str) -> Option<usize> {
        self.slots.binary_search_by(|s| s.name.as_str().cmp(name)).ok()
    }
}

/// A tiny regression model and its loss, shared by the optimizer's and the
/// checkpoints' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use candle_core::{DType, Device};

    pub(crate) fn tensor(shape: &[usize], phase: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + 1.0) * 0.37 + phase).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A tiny regression model: `w` `[3, 4]`, `b` `[4]`, and an integer buffer that is saved
    /// but not optimized.
    pub(crate) fn model(phase: f32) -> VarMap {
        let vars = VarMap::new();
        {
            let mut data = vars.data().lock().unwrap();
            data.insert(
                "layer.w".into(),
                Var::from_tensor(&tensor(&[3, 4], phase)).unwrap(),
            );
            data.insert(
                "layer.b".into(),
                Var::from_tensor(&tensor(&[4], phase + 1.0)).unwrap(),
            );
            let counts = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
            data.insert("counts".into(), Var::from_tensor(&counts).unwrap());
        }
        vars
    }

    pub(crate) fn var(vars: &VarMap, name: &str) -> Tensor {
        vars.data().lock().unwrap()[name].as_tensor().clone()
    }

    /// Mean squared error of the model on a fixed batch; `step` varies the batch.
    pub(crate) fn loss(vars: &VarMap, step: usize) -> Tensor {
        let x = tensor(&[5, 3], step as f32 * 0.1);
        let y = tensor(&[5, 4], 2.0 + step as f32 * 0.3);
        let pred = x
            .matmul(&var(vars, "layer.w"))
            .unwrap()
            .broadcast_add(&var(vars, "layer.b"))
            .unwrap();
        (pred - y).unwrap().sqr().unwrap().mean_all().unwrap()
    }

    pub(crate) fn params() -> ParamsAdamW {
        ParamsAdamW {
            lr: 0.05,
            weight_decay: 0.1,
            ..Default::default()
        }
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap();
        let b = b.to_dtype(DType::F32).unwrap();
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(crate) fn assert_same_vars(a: &VarMap, b: &VarMap, tol: f32) {
        for name in ["layer.w", "layer.b", "counts"] {
            let d = max_diff(&var(a, name), &var(b, name));
            assert!(d <= tol, "{name}: max diff {d} > {tol}");
        }
    }

    /// Runs `steps` of our AdamW from step `from`, varying the lr like a schedule.
    pub(crate) fn train(vars: &VarMap, opt: &mut AdamW, from: usize, steps: usize) {
        for s in from..from + steps {
            opt.set_learning_rate(0.05 / (1.0 + s as f64));
            opt.step(&loss(vars, s).backward().unwrap()).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use candle_nn::Optimizer;

    #[test]
    fn adamw_matches_candle_nn() {
        let ours = model(0.0);
        let theirs = model(0.0);
        let mut a = AdamW::new(&ours, params(), |_| true, false).unwrap();
        let float_vars: Vec<Var> = theirs
            .all_vars()
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .collect();
        let mut b = candle_nn::AdamW::new(float_vars, params()).unwrap();
        for s in 0..8 {
            let lr = 0.05 / (1.0 + s as f64);
            a.set_learning_rate(lr);
            b.set_learning_rate(lr);
            a.step(&loss(&ours, s).backward().unwrap()).unwrap();
            b.step(&loss(&theirs, s).backward().unwrap()).unwrap();
            assert_same_vars(&ours, &theirs, 1e-6);
        }
        assert_eq!(a.step_count(), 8);
        assert_eq!(a.var_names().collect::<Vec<_>>(), ["layer.b", "layer.w"]);
        assert!(a.moments("counts").is_none());
        // The variables did move.
        assert!(max_diff(&var(&ours, "layer.w"), &tensor(&[3, 4], 0.0)) > 1e-3);
    }
}
