//! Weight initialization: seeded (every variable drawn from a stream keyed
//! by `(seed, name)`, so one seed gives the same initial weights on every
//! run and in any creation order; candle's CPU generator cannot be seeded),
//! or zero placeholders that a checkpoint is about to overwrite.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::util::rng::Rng;

/// The model's variables, each drawn from a stream keyed by `(seed, name)`
/// when it is created: one seed gives the same initial weights on every run
/// and in any creation order (candle's CPU generator cannot be seeded).
/// Existing variables are returned as they are, as [`VarMap`] does.
pub struct SeededVars {
    vars: VarMap,
    /// `None`: zeros (placeholders for a checkpoint's values).
    seed: Option<u64>,
}

impl SeededVars {
    /// A builder creating its variables in `vars` from `seed`.
    pub fn builder(vars: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
        let backend = Self {
            vars: vars.clone(),
            seed: Some(seed),
        };
        VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
    }

    /// A builder creating its variables in `vars` as zeros of `dtype`: the
    /// shapes a model asks for, to be filled from a checkpoint. Zeros cost
    /// no random draws (a 2B model's would take minutes on a CPU).
    pub fn placeholders(vars: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = Self {
            vars: vars.clone(),
            seed: None,
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Values of a fresh `shape` variable under `init`, from `rng`.
    pub(crate) fn draw(shape: &Shape, init: Init, rng: &mut Rng) -> Vec<f32> {
        let n = shape.elem_count();
        let mut normal = || {
            // Box-Muller; 1 - u keeps the logarithm finite.
            let (u1, u2) = (1.0 - rng.uniform() as f64, rng.uniform() as f64);
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        let (mean, stdev, uniform) = match init {
            Init::Const(c) => return vec![c as f32; n],
            Init::Randn { mean, stdev } => (mean, stdev, None),
            Init::Uniform { lo, up } => (0.0, 0.0, Some((lo, up))),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => (0.0, std, None),
                    NormalOrUniform::Uniform => (0.0, 0.0, Some((-(3f64.sqrt()) * std, 3f64.sqrt() * std))),
                }
            }
        };
        match uniform {
            Some((lo, up)) => (0..n)
                .map(|_| (lo + (up - lo) * rng.uniform() as f64) as f32)
                .collect(),
            None => (0..n).map(|_| (mean + stdev * normal()) as f32).collect(),
        }
    }
}

/// FNV-1a of a variable's name: part of its stream's key.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for SeededVars {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut vars = self.vars.data().lock().expect("variables lock");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let value = match self.seed {
            Some(seed) => {
                let mut rng = Rng::derive(&[seed, name_key(name)]);
                let values = Self::draw(&shape, init, &mut rng);
                Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?
            }
            None => Tensor::zeros(shape, dtype, device)?,
        };
        let var = Var::from_tensor(&value)?;
        vars.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a seeded variable needs its shape and initialization")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.vars
            .data()
            .lock()
            .expect("variables lock")
            .contains_key(name)
    }
}
