//! Resumable training checkpoints: the model weights, the AdamW state and
//! where training stood, in one safetensors file written atomically (a
//! Ctrl-C, [`crate::util::interrupt`], stops a run at a step boundary with
//! a usable one).
//!
//! # File layout
//!
//! A checkpoint is a single standard safetensors file:
//!
//! - every model variable under its own `VarMap` name (`lm.layers.0.attn.qkv.weight`, …),
//!   so any safetensors reader — and `VarMap::load` — sees the weights as usual;
//! - when saved with an optimizer, the AdamW first and second moments of each variable under
//!   `optimizer.m.<name>` and `optimizer.v.<name>`, same shape as the variable, f32; and the
//!   f32 master copy of each variable that has one under `optimizer.master.<name>`;
//! - in the header's `__metadata__` (string to string):
//!   - `format`: [`FORMAT`];
//!   - `training_state`: the [`TrainingState`] as JSON;
//!   - `optimizer` (only with an optimizer): JSON `{"step", "lr", "beta1", "beta2", "eps",
//!     "weight_decay"}`, the optimizer's step count and hyperparameters.
//!
//! Files written by the older `VarMap::save` (weights only, no metadata) still load, as
//! weights with [`TrainingState::default`].
//!
//! [`save`] writes through [`write_atomically`] (a temporary file in the same folder, fsynced,
//! renamed over `path`), so a crash or Ctrl-C at any moment leaves either the previous checkpoint
//! or the new one, never a torn file. [`load`] checks every tensor (present, right shape and
//! dtype, no unknown ones) before it changes anything, and reports problems as a
//! [`CheckpointError`] naming the file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use safetensors::tensor::{Metadata, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::train::optim::AdamW;
use crate::util::fs::write_atomically;

/// Value of the `format` metadata key of the checkpoints written by [`save`].
pub const FORMAT: &str = "r1_sgg-checkpoint-v1";

/// Prefix of the optimizer's first-moment tensors (`optimizer.m.<name>`).
pub const FIRST_MOMENT_PREFIX: &str = "optimizer.m.";

/// Prefix of the optimizer's second-moment tensors (`optimizer.v.<name>`).
pub const SECOND_MOMENT_PREFIX: &str = "optimizer.v.";

/// Prefix of the optimizer's f32 master weights (`optimizer.master.<name>`).
pub const MASTER_PREFIX: &str = "optimizer.master.";

/// Prefix reserved for optimizer state; no model variable may start with it.
const OPTIMIZER_PREFIX: &str = "optimizer.";

const KEY_FORMAT: &str = "format";
const KEY_STATE: &str = "training_state";
const KEY_OPTIMIZER: &str = "optimizer";

/// Where training stood when a checkpoint was written, stored as JSON in the checkpoint's
/// metadata (key `training_state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Stage that wrote the checkpoint (`"sft"`, `"grpo"`, …; `"unknown"` for weights-only files).
    pub stage: String,
    /// Optimizer steps completed in that stage.
    pub step: usize,
    /// Seed of the run, to restore its data order and sampling.
    pub seed: u64,
    /// Anything else the stage needs to resume (free-form).
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

impl Default for TrainingState {
    /// The state given to checkpoints without one: stage `"unknown"`, step 0, seed 0.
    fn default() -> Self {
        Self {
            stage: "unknown".to_string(),
            step: 0,
            seed: 0,
            extra: BTreeMap::new(),
        }
    }
}

/// Why a checkpoint could not be written or read. Every variant names the file; `Display`
/// says what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The checkpoint file does not exist.
    #[error("checkpoint {} does not exist", path.display())]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// Reading or writing the file failed.
    #[error("checkpoint {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a safetensors file, or its header or data are corrupt or truncated.
    #[error("checkpoint {} is not a valid safetensors file (corrupt or truncated?): {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser found.
        reason: String,
    },
    /// A tensor the model (or the optimizer) needs is not in the file.
    #[error("checkpoint {} has no tensor `{name}`", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// Name of the tensor.
        name: String,
    },
    /// The file holds a tensor that is neither a model variable nor optimizer state.
    #[error("checkpoint {} has a tensor `{name}` that the model does not have", path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// Name of the tensor.
        name: String,
    },
    /// A tensor in the file has a different shape than the model's variable.
    #[error("checkpoint {}: tensor `{name}` has shape {found:?}, the model expects {expected:?}", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// Name of the tensor.
        name: String,
        /// Shape of the model's variable.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor in the file has a different dtype than the model's variable.
    #[error("checkpoint {}: tensor `{name}` has dtype {found}, the model expects {expected:?}", path.display())]
    DtypeMismatch {
        /// The file.
        path: PathBuf,
        /// Name of the tensor.
        name: String,
        /// Dtype of the model's variable.
        expected: DType,
        /// Dtype in the file.
        found: String,
    },
    /// An optimizer was given to [`load`] but the file has no optimizer state (a weights-only
    /// checkpoint).
    #[error("checkpoint {} has no optimizer state (a weights-only checkpoint cannot resume training)", path.display())]
    MissingOptimizerState {
        /// The file.
        path: PathBuf,
    },
    /// The metadata (format, training state or optimizer JSON) is missing a field, is not
    /// valid JSON, or is from an unsupported format version.
    #[error("checkpoint {} has bad metadata: {reason}", path.display())]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A model variable is named with the reserved `optimizer.` prefix, so [`save`] cannot
    /// store it unambiguously.
    #[error("checkpoint {}: model variable `{name}` uses the reserved prefix `{OPTIMIZER_PREFIX}`", path.display())]
    ReservedName {
        /// The file.
        path: PathBuf,
        /// Name of the variable.
        name: String,
    },
    /// A tensor operation failed while gathering or restoring tensors.
    #[error("checkpoint {}: {source}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The candle error.
        #[source]
        source: candle_core::Error,
    },
}

impl From<CheckpointError> for candle_core::Error {
    /// Lets `?` turn a checkpoint error into a candle error (keeping its message).
    fn from(e: CheckpointError) -> Self {
        candle_core::Error::Msg(e.to_string())
    }
}

/// The optimizer's step count and hyperparameters, as stored in the `optimizer` metadata.
#[derive(Debug, Serialize, Deserialize)]
struct OptimizerMeta {
    step: usize,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// Writes a checkpoint of `vars` (and of `opt`'s moments and step count, if given) with
/// `state` to `path`, atomically: the file is written to `<path>.tmp` in the same folder,
/// fsynced and renamed over `path`, so `path` always holds a complete checkpoint. Creates the
/// folder if needed. See the [module docs](self) for the layout.
pub fn save(
    path: &Path,
    vars: &VarMap,
    opt: Option<&AdamW>,
    state: &TrainingState,
) -> std::result::Result<(), CheckpointError> {
    let (tensors, metadata) = contents(path, vars, opt, state)?;
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    let bytes =
        safetensors::tensor::serialize(tensors, Some(metadata)).map_err(|e| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("cannot serialize: {e}"),
        })?;
    write_atomically(path, &bytes).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A checkpoint's tensors by name and its header's `__metadata__`.
pub type Contents = (Vec<(String, Tensor)>, BTreeMap<String, String>);

/// The tensors and header metadata [`save`] writes to `path` (named in errors): a writer of
/// its own can store the same checkpoint (a Hugging Face checkpoint directory's trainer state,
/// with an empty `vars`: the weights are the directory's own files).
pub fn contents(
    path: &Path,
    vars: &VarMap,
    opt: Option<&AdamW>,
    state: &TrainingState,
) -> std::result::Result<Contents, CheckpointError> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    {
        let data = vars.data().lock().expect("VarMap lock poisoned");
        for (name, var) in data.iter() {
            if name.starts_with(OPTIMIZER_PREFIX) {
                return Err(CheckpointError::ReservedName {
                    path: path.to_path_buf(),
                    name: name.clone(),
                });
            }
            tensors.push((name.clone(), var.as_tensor().clone()));
        }
    }
    let mut metadata = BTreeMap::new();
    metadata.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
    let state_json = serde_json::to_string(state).map_err(|e| CheckpointError::BadMetadata {
        path: path.to_path_buf(),
        reason: format!("cannot encode the training state: {e}"),
    })?;
    metadata.insert(KEY_STATE.to_string(), state_json);
    if let Some(opt) = opt {
        for slot in &opt.slots {
            tensors.push((format!("{FIRST_MOMENT_PREFIX}{}", slot.name), slot.m.clone()));
            tensors.push((format!("{SECOND_MOMENT_PREFIX}{}", slot.name), slot.v.clone()));
            if let Some(master) = &slot.master {
                tensors.push((format!("{MASTER_PREFIX}{}", slot.name), master.clone()));
            }
        }
        let p = &opt.params;
        let meta = OptimizerMeta {
            step: opt.step_t,
            lr: p.lr,
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
        };
        let json = serde_json::to_string(&meta).map_err(|e| CheckpointError::BadMetadata {
            path: path.to_path_buf(),
            reason: format!("cannot encode the optimizer state: {e}"),
        })?;
        metadata.insert(KEY_OPTIMIZER.to_string(), json);
    }
    Ok((tensors, metadata))
}

/// Reads a checkpoint written by [`save`] (or a weights-only file written by
/// `VarMap::save`) into `vars`, and into `opt` (moments and step count) if given, and returns
/// the training state ([`TrainingState::default`] for files without one).
///
/// Every variable of `vars` must be in the file with the same shape and dtype, and the file
/// may hold no other tensors than those and optimizer state; with `opt`, the file must have
/// optimizer state with both moments of every optimized variable. Everything is checked
/// before anything is changed: on error, `vars` and `opt` are as they were. The optimizer's
/// hyperparameters are not restored (they come from the run's configuration; the file records
/// them for inspection). Optimizer state in the file is ignored when `opt` is `None`.
pub fn load(
    path: &Path,
    vars: &mut VarMap,
    opt: Option<&mut AdamW>,
) -> std::result::Result<TrainingState, CheckpointError> {
    let p = || path.to_path_buf();
    let bytes = fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::NotFound { path: p() },
        _ => CheckpointError::Io { path: p(), source },
    })?;
    let corrupt = |e: safetensors::SafeTensorError| CheckpointError::Corrupt {
        path: p(),
        reason: e.to_string(),
    };
    let (_, header): (usize, Metadata) = SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let file = SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let meta = header.metadata().clone().unwrap_or_default();

    let bad_meta = |reason: String| CheckpointError::BadMetadata { path: p(), reason };
    if let Some(format) = meta.get(KEY_FORMAT) {
        if format != FORMAT {
            return Err(bad_meta(format!(
                "unsupported format `{format}` (this program reads `{FORMAT}`)"
            )));
        }
    }
    let state = match meta.get(KEY_STATE) {
        Some(json) => serde_json::from_str::<TrainingState>(json)
            .map_err(|e| bad_meta(format!("training_state: {e}")))?,
        None => TrainingState::default(),
    };
    let opt_meta = match meta.get(KEY_OPTIMIZER) {
        Some(json) => Some(
            serde_json::from_str::<OptimizerMeta>(json).map_err(|e| bad_meta(format!("optimizer: {e}")))?,
        ),
        None => None,
    };

    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = file.tensors().into_iter().collect();
    // Reads tensor `name` shaped and typed like `like`, onto its device.
    let fetch = |name: &str, like: &Tensor| -> std::result::Result<Tensor, CheckpointError> {
        let view = views.get(name).ok_or_else(|| CheckpointError::MissingTensor {
            path: p(),
            name: name.to_string(),
        })?;
        if view.shape() != like.dims() {
            return Err(CheckpointError::ShapeMismatch {
                path: p(),
                name: name.to_string(),
                expected: like.dims().to_vec(),
                found: view.shape().to_vec(),
            });
        }
        if DType::try_from(view.dtype()).ok() != Some(like.dtype()) {
            return Err(CheckpointError::DtypeMismatch {
                path: p(),
                name: name.to_string(),
                expected: like.dtype(),
                found: format!("{:?}", view.dtype()),
            });
        }
        view.load(like.device())
            .map_err(|source| CheckpointError::Tensor { path: p(), source })
    };

    // Gather and check everything first.
    let data = vars.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut weights = Vec::with_capacity(names.len());
    for name in names {
        let var = &data[name];
        weights.push((var, fetch(name, var.as_tensor())?));
    }
    let mut extra: Vec<&String> = views
        .keys()
        .filter(|n| !data.contains_key(*n) && !n.starts_with(OPTIMIZER_PREFIX))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(CheckpointError::UnexpectedTensor {
            path: p(),
            name: name.to_string(),
        });
    }
    let mut moments = Vec::new();
    if let Some(opt) = opt.as_deref() {
        if opt_meta.is_none() {
            return Err(CheckpointError::MissingOptimizerState { path: p() });
        }
        for slot in &opt.slots {
            let m = fetch(&format!("{FIRST_MOMENT_PREFIX}{}", slot.name), &slot.m)?;
            let v = fetch(&format!("{SECOND_MOMENT_PREFIX}{}", slot.name), &slot.v)?;
            let master = match &slot.master {
                Some(like) => Some(fetch(&format!("{MASTER_PREFIX}{}", slot.name), like)?),
                None => None,
            };
            moments.push((m, v, master));
        }
        let mut extra: Vec<&String> = views
            .keys()
            .filter(|n| n.starts_with(OPTIMIZER_PREFIX))
            .filter(|n| {
                let var = n
                    .strip_prefix(FIRST_MOMENT_PREFIX)
                    .or_else(|| n.strip_prefix(SECOND_MOMENT_PREFIX));
                let master = n.strip_prefix(MASTER_PREFIX);
                let known = |var: &str| opt.slot_index(var).is_some();
                let master_known =
                    |var: &str| opt.slot_index(var).is_some_and(|i| opt.slots[i].master.is_some());
                !(var.is_some_and(known) || master.is_some_and(master_known))
            })
            .collect();
        extra.sort();
        if let Some(name) = extra.first() {
            return Err(CheckpointError::UnexpectedTensor {
                path: p(),
                name: name.to_string(),
            });
        }
    }

    // Then apply.
    for (var, value) in weights {
        var.set(&value)
            .map_err(|source| CheckpointError::Tensor { path: p(), source })?;
    }
    drop(data);
    if let (Some(opt), Some(om)) = (opt, opt_meta) {
        for (slot, (m, v, master)) in opt.slots.iter_mut().zip(moments) {
            slot.m = m;
            slot.v = v;
            slot.master = master;
        }
        opt.step_t = om.step;
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::fixtures::*;
    use crate::util::fs::{temp_dir, temp_path};
    use candle_core::Var;

    #[test]
    fn save_load_round_trip_resumes_exactly() {
        let dir = temp_dir("resume");
        let path = dir.join("run.safetensors");

        // Uninterrupted: 7 steps.
        let full = model(0.0);
        let mut full_opt = AdamW::new(&full, params(), |_| true, false).unwrap();
        train(&full, &mut full_opt, 0, 7);

        // Interrupted after 4, saved, restored into a fresh model and optimizer, 3 more.
        let first = model(0.0);
        let mut first_opt = AdamW::new(&first, params(), |_| true, false).unwrap();
        train(&first, &mut first_opt, 0, 4);
        let mut extra = BTreeMap::new();
        extra.insert("best_recall".to_string(), "0.25".to_string());
        let state = TrainingState {
            stage: "grpo".into(),
            step: 4,
            seed: 12345678901234567890,
            extra,
        };
        save(&path, &first, Some(&first_opt), &state).unwrap();
        assert!(!temp_path(&path).exists(), "the temporary file was left behind");
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["run.safetensors"]);

        let mut resumed = model(5.0);
        let mut resumed_opt = AdamW::new(&resumed, params(), |_| true, false).unwrap();
        let got = load(&path, &mut resumed, Some(&mut resumed_opt)).unwrap();
        assert_eq!(got, state);
        assert_same_vars(&resumed, &first, 0.0);
        assert_eq!(resumed_opt.step_count(), 4);
        for name in ["layer.w", "layer.b"] {
            let (m0, v0) = first_opt.moments(name).unwrap();
            let (m1, v1) = resumed_opt.moments(name).unwrap();
            assert_eq!(max_diff(m0, m1), 0.0);
            assert_eq!(max_diff(v0, v1), 0.0);
        }
        train(&resumed, &mut resumed_opt, 4, 3);
        assert_same_vars(&resumed, &full, 0.0);

        // The weights alone load too (evaluation), ignoring the optimizer state.
        let mut weights = model(9.0);
        assert_eq!(load(&path, &mut weights, None).unwrap().stage, "grpo");
        assert_same_vars(&weights, &first, 0.0);

        // Saving again replaces the file atomically.
        save(&path, &resumed, Some(&resumed_opt), &TrainingState::default()).unwrap();
        assert_eq!(load(&path, &mut weights, None).unwrap(), TrainingState::default());
        assert!(!temp_path(&path).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn old_varmap_files_load_as_weights() {
        let dir = temp_dir("old");
        let path = dir.join("sft.safetensors");
        let old = model(0.0);
        old.save(&path).unwrap();
        let mut vars = model(3.0);
        let state = load(&path, &mut vars, None).unwrap();
        assert_eq!(state, TrainingState::default());
        assert_eq!(state.stage, "unknown");
        assert_eq!(state.step, 0);
        assert_same_vars(&vars, &old, 0.0);

        // Weights-only checkpoints cannot restore an optimizer.
        let mut opt = AdamW::new(&vars, params(), |_| true, false).unwrap();
        let err = load(&path, &mut vars, Some(&mut opt)).unwrap_err();
        assert!(
            matches!(err, CheckpointError::MissingOptimizerState { .. }),
            "{err}"
        );
        // And `VarMap::load` reads our checkpoints.
        let ours = dir.join("new.safetensors");
        save(&ours, &old, Some(&opt), &TrainingState::default()).unwrap();
        let mut via_candle = model(7.0);
        via_candle.load(&ours).unwrap();
        assert_same_vars(&via_candle, &old, 0.0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_checkpoints_are_typed_errors() {
        let dir = temp_dir("bad");
        let path = dir.join("ok.safetensors");
        let vars = model(0.0);
        let opt = AdamW::new(&vars, params(), |_| true, false).unwrap();
        save(&path, &vars, Some(&opt), &TrainingState::default()).unwrap();
        let mut target = model(1.0);

        let missing = dir.join("nope.safetensors");
        let err = load(&missing, &mut target, None).unwrap_err();
        assert!(matches!(err, CheckpointError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("nope.safetensors"), "{err}");

        let bytes = fs::read(&path).unwrap();
        let truncated = dir.join("truncated.safetensors");
        fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
        let err = load(&truncated, &mut target, None).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("truncated.safetensors"), "{err}");

        let header_cut = dir.join("header.safetensors");
        fs::write(&header_cut, &bytes[..20]).unwrap();
        let err = load(&header_cut, &mut target, None).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");

        let text = dir.join("text.safetensors");
        fs::write(&text, b"not a checkpoint at all").unwrap();
        let err = load(&text, &mut target, None).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");

        // A model with a differently shaped variable.
        let mut reshaped = model(1.0);
        reshaped
            .data()
            .lock()
            .unwrap()
            .insert("layer.w".into(), Var::from_tensor(&tensor(&[4, 3], 0.0)).unwrap());
        let before = var(&reshaped, "layer.b");
        let err = load(&path, &mut reshaped, None).unwrap_err();
        match &err {
            CheckpointError::ShapeMismatch {
                name,
                expected,
                found,
                ..
            } => {
                assert_eq!(name, "layer.w");
                assert_eq!(expected, &[4, 3]);
                assert_eq!(found, &[3, 4]);
            }
            _ => panic!("expected ShapeMismatch, got {err}"),
        }
        assert!(err.to_string().contains("layer.w"), "{err}");
        // Nothing was changed.
        assert_eq!(max_diff(&var(&reshaped, "layer.b"), &before), 0.0);

        // A model with a variable the file lacks.
        let mut bigger = model(1.0);
        bigger.data().lock().unwrap().insert(
            "layer.extra".into(),
            Var::from_tensor(&tensor(&[2], 0.0)).unwrap(),
        );
        let err = load(&path, &mut bigger, None).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::MissingTensor { name, .. } if name == "layer.extra"),
            "{err}"
        );

        // A model lacking a variable the file has.
        let mut smaller = model(1.0);
        smaller.data().lock().unwrap().remove("layer.b");
        let err = load(&path, &mut smaller, None).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::UnexpectedTensor { name, .. } if name == "layer.b"),
            "{err}"
        );

        // A variable of another dtype.
        let mut f64_model = model(1.0);
        f64_model.data().lock().unwrap().insert(
            "layer.b".into(),
            Var::from_tensor(&tensor(&[4], 0.0).to_dtype(DType::F64).unwrap()).unwrap(),
        );
        let err = load(&path, &mut f64_model, None).unwrap_err();
        assert!(
            matches!(&err, CheckpointError::DtypeMismatch { name, .. } if name == "layer.b"),
            "{err}"
        );

        // Garbage training state.
        let bad_meta = dir.join("meta.safetensors");
        let mut meta = HashMap::new();
        meta.insert(KEY_FORMAT.to_string(), FORMAT.to_string());
        meta.insert(KEY_STATE.to_string(), "{\"stage\": 3}".to_string());
        let tensors = vec![("layer.b".to_string(), tensor(&[4], 0.0))];
        fs::write(
            &bad_meta,
            safetensors::tensor::serialize(tensors, Some(meta)).unwrap(),
        )
        .unwrap();
        let err = load(&bad_meta, &mut target, None).unwrap_err();
        assert!(matches!(err, CheckpointError::BadMetadata { .. }), "{err}");

        // The errors convert for `?` in candle and `Box<dyn Error>` code.
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        assert!(boxed.to_string().contains("meta.safetensors"));
        let candle: candle_core::Error = load(&missing, &mut target, None).unwrap_err().into();
        assert!(candle.to_string().contains("does not exist"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_save_leaves_the_old_checkpoint() {
        let dir = temp_dir("fail");
        let path = dir.join("ckpt.safetensors");
        let vars = model(0.0);
        save(&path, &vars, None, &TrainingState::default()).unwrap();
        // A folder where the temporary file should go makes the write fail.
        fs::create_dir(temp_path(&path)).unwrap();
        let err = save(&path, &model(2.0), None, &TrainingState::default()).unwrap_err();
        assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
        fs::remove_dir(temp_path(&path)).unwrap();
        let mut back = model(4.0);
        load(&path, &mut back, None).unwrap();
        assert_same_vars(&back, &vars, 0.0);

        let reserved = model(0.0);
        reserved.data().lock().unwrap().insert(
            "optimizer.m.x".into(),
            Var::from_tensor(&tensor(&[1], 0.0)).unwrap(),
        );
        let err = save(&path, &reserved, None, &TrainingState::default()).unwrap_err();
        assert!(matches!(err, CheckpointError::ReservedName { .. }), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
