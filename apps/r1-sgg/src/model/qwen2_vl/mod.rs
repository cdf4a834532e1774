//! Qwen2-VL (`Qwen2VLForConditionalGeneration`, transformers
//! `models/qwen2_vl/modeling_qwen2_vl.py` 5.25.0) on candle, trainable: every
//! op has a backward, and the decoder layers and vision blocks can be
//! checkpointed.
//!
//! Layout as candle's `qwen3_vl`: [`config`] (HF `config.json`), `vision`
//! (the ViT and its merger), `text` (the Qwen2 decoder with M-RoPE),
//! [`rope`] (the M-RoPE position ids of a prompt with images), and here the
//! joined model. [`Qwen2Vl::new`]'s `vb.pp(..)` chain is the only place where
//! the Hub's tensor names meet the module structure: `visual.*`, `model.*`
//! and `lm_head.weight` (absent when the embeddings are tied).
//!
//! The forward, as transformers': token embeddings, with the `k`-th
//! `<|image_pad|>` token's row replaced by the `k`-th merged vision token
//! (images in order); M-RoPE positions from [`rope::get_rope_index`] unless
//! given; the decoder with a causal and padding mask; `logits = h W^T` with
//! `W` the LM head (the token embedding when tied). Training takes token
//! log-probs from the hidden states with
//! `grpo_kernels::candle::fused_linear_logprobs` ([`Qwen2Vl::token_logprobs`]),
//! never materializing `[tokens, vocab]` logits.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use grpo_kernels::FusedLinearConfig;
//! use r1_sgg::model::qwen2_vl::{Checkpointing, Config, Inputs, Qwen2Vl};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = Config::from_json_str(
//!     r#"{"model_type": "qwen2_vl", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
//!         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
//!         "rms_norm_eps": 1e-6, "rope_theta": 1e6,
//!         "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
//!         "vision_start_token_id": 28, "vision_end_token_id": 29, "video_token_id": 30,
//!         "image_token_id": 31,
//!         "vision_config": {"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_size": 16}}"#,
//! )?;
//! let vars = VarMap::new();
//! let mut model = Qwen2Vl::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
//! model.set_checkpointing(Checkpointing { text: true, vision: true });
//! // One 2x2-patch image (one merged token) between its vision markers.
//! let input = Inputs {
//!     input_ids: Tensor::new(&[[1u32, 28, 31, 29, 5, 6, 7]], &Device::Cpu)?,
//!     attention_mask: None,
//!     pixel_values: Some(Tensor::randn(0f32, 1., (4, cfg.vision.patch_dim()), &Device::Cpu)?),
//!     image_grid_thw: vec![[1, 2, 2]],
//!     position_ids: None,
//! };
//! // Training: next-token log-probs from the hidden states, gradients for every weight.
//! let lp = model.token_logprobs(&input, None, &FusedLinearConfig::default())?;
//! let grads = model.backward(&lp.logp.sum_all()?.neg()?)?;
//! assert!(vars.all_vars().iter().all(|v| grads.get(v).is_some()));
//! // Generation: the prompt once, then one token per step.
//! let (mut cache, logits) = model.prefill(&input)?;
//! let logits = model.decode_step(&mut cache, &logits.argmax(1)?)?;
//! assert_eq!(logits.dims(), &[1, 32]);
//! # Ok(()) }
//! ```

pub mod config;
pub mod rope;

mod checkpoint;
mod text;
mod vision;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use candle_nn::{Init, Linear, VarBuilder};
use grpo_kernels::candle::{fused_linear_logprobs, LogProbTensors};
use grpo_kernels::FusedLinearConfig;

pub use config::{Config, ConfigError, ConfigFileError, TextConfig, VisionConfig};
pub use rope::{get_rope_index, RopeError, RopeIndex};

use checkpoint::CheckpointGrads;
use text::{LayerKv, TextModel, MASKED};
use vision::VisionModel;

/// transformers' `initializer_range`: fresh weights are `N(0, 0.02)`.
const INIT_STD: f64 = 0.02;

/// A linear layer `[out, in]` (+ `[out]` bias) named `weight`/`bias` under
/// `vb`; fresh ones as transformers initializes them (normal weights, zero bias).
fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: INIT_STD,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = bias
        .then(|| vb.get_with_hints(out_dim, "bias", Init::Const(0.0)))
        .transpose()?;
    Ok(Linear::new(w, b))
}

/// A norm's scale `[dim]` named `weight`; fresh ones are 1.
fn norm_weight(dim: usize, vb: VarBuilder) -> candle_core::Result<Tensor> {
    vb.get_with_hints(dim, "weight", Init::Const(1.0))
}

/// Which blocks run under gradient checkpointing (see [`Qwen2Vl::backward`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpointing {
    /// Each decoder layer.
    pub text: bool,
    /// Each vision block.
    pub vision: bool,
}

/// A batch for [`Qwen2Vl`]. Images are in prompt order across the batch:
/// the `k`-th grid describes the `k`-th run of `<|image_pad|>` tokens.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `[B, T]` U32.
    pub input_ids: Tensor,
    /// `[B, T]`, nonzero for real tokens (any dtype); `None` = all real.
    pub attention_mask: Option<Tensor>,
    /// `[sum(t h w), C*T*P*P]`: every image's patches, as the processor cuts them.
    pub pixel_values: Option<Tensor>,
    /// `[t, h, w]` in patches per image (`image_grid_thw`).
    pub image_grid_thw: Vec<[usize; 3]>,
    /// `[3, B, T]` M-RoPE positions (integer dtype); `None` = [`get_rope_index`].
    pub position_ids: Option<Tensor>,
}

impl Inputs {
    /// Text only, no mask.
    pub fn text(input_ids: Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            pixel_values: None,
            image_grid_thw: Vec::new(),
            position_ids: None,
        }
    }
}

/// Bad input or a failed tensor op; input errors name what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input has the wrong dtype.
    #[error("{what} must be {expected}, got {found:?}")]
    Dtype {
        /// Which input.
        what: &'static str,
        /// The dtype(s) accepted.
        expected: &'static str,
        /// Its dtype.
        found: DType,
    },
    /// An input has the wrong shape.
    #[error("{what} must be {expected}, got {found:?}")]
    Shape {
        /// Which input.
        what: &'static str,
        /// The shape accepted.
        expected: String,
        /// Its shape.
        found: Vec<usize>,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {id} at row {row}, position {pos} is not below vocab_size {vocab}")]
    TokenId {
        /// Row of the batch.
        row: usize,
        /// Position in the row.
        pos: usize,
        /// The id.
        id: u32,
        /// `vocab_size`.
        vocab: usize,
    },
    /// The prompt's `<|image_pad|>` tokens do not match the images' merged patches.
    #[error("the prompt has {found} <|image_pad|> tokens, the images give {expected}")]
    ImageTokens {
        /// Image tokens in `input_ids`.
        found: usize,
        /// `sum(t h w) / merge^2` over the grids.
        expected: usize,
    },
    /// `pixel_values` and `image_grid_thw` disagree (one without the other,
    /// or a row count other than `sum(t h w)`).
    #[error("pixel_values has {found} patches, image_grid_thw gives {expected}")]
    Pixels {
        /// Rows of `pixel_values` (0 when absent).
        found: usize,
        /// `sum(t h w)` (0 without grids).
        expected: usize,
    },
    /// Invalid grids or image runs (see [`RopeError`]).
    #[error(transparent)]
    Rope(#[from] RopeError),
    /// Gradients of checkpointed blocks were left in the store by a
    /// `loss.backward()` not followed by [`Qwen2Vl::collect_checkpoint_grads`].
    #[error(
        "{pending} checkpointed parameters hold gradients from an earlier backward that were not \
         collected: with checkpointing, call Qwen2Vl::backward(loss) (or collect_checkpoint_grads)"
    )]
    UncollectedGradients {
        /// Parameters with stored gradients.
        pending: usize,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl From<Error> for candle_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Tensor(e) => e,
            e => candle_core::Error::wrap(e),
        }
    }
}

/// This module's result.
pub type Result<T> = std::result::Result<T, Error>;

/// Keys and values of a batch's tokens so far, for decoding ([`Qwen2Vl::prefill`],
/// [`Qwen2Vl::decode_step`]). Detached: it keeps no graph.
///
/// Each layer's keys and values sit in buffers with room to grow: a decoding
/// step writes its token in place (no copy of what is cached), a full buffer
/// is reallocated to twice its size, and [`KvCache::reserve`] makes room for
/// a known number of tokens at once. A prompt's cache can be computed once
/// and repeated for several completions ([`KvCache::repeat_interleave`]);
/// rows that finished can be dropped ([`KvCache::select_rows`]).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// `[B, S]` additive mask of the cached keys (padding = masked).
    pad: Tensor,
    /// Per row, the M-RoPE position of the next token (the same on all three
    /// axes): the row's largest position so far + 1, i.e. transformers'
    /// `tokens so far + rope_delta`.
    next_position: Vec<i64>,
}

impl KvCache {
    /// Tokens cached per row (padding included).
    pub fn len(&self) -> usize {
        self.pad.dim(1).unwrap_or(0)
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per row, the position the next token gets.
    pub fn next_positions(&self) -> &[i64] {
        &self.next_position
    }

    /// Rows cached.
    pub fn rows(&self) -> usize {
        self.next_position.len()
    }

    /// Makes room for `extra` more tokens per row, so that the next `extra`
    /// decoding steps reallocate nothing.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let len = self.len();
        for layer in self.layers.iter_mut().flatten() {
            layer.reserve(len + extra)?;
        }
        Ok(())
    }

    /// Each row repeated `times` times in place (rows `0,0,..,1,1,..`), as
    /// transformers' `repeat_interleave` on the batch: the cache of a prompt
    /// computed once serves `times` completions, which share its rope delta.
    pub fn repeat_interleave(&self, times: usize) -> Result<Self> {
        let rows: Vec<usize> = (0..self.rows())
            .flat_map(|r| std::iter::repeat_n(r, times))
            .collect();
        self.select_rows(&rows)
    }

    /// The cache of rows `rows` of this one, in that order (a row may repeat);
    /// e.g. the rows still generating.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let b = self.rows();
        if let Some(&bad) = rows.iter().find(|&&r| r >= b) {
            return Err(Error::Shape {
                what: "rows",
                expected: format!("row indices below {b} (the cached batch)"),
                found: vec![bad],
            });
        }
        let index: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let index = Tensor::from_vec(index, rows.len(), self.pad.device())?;
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|c| c.select_rows(&index)).transpose())
                .collect::<candle_core::Result<_>>()?,
            pad: self.pad.index_select(&index, 0)?,
            next_position: rows.iter().map(|&r| self.next_position[r]).collect(),
        })
    }

    /// A copy that decodes on independently of this one.
    pub fn deep_copy(&self) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.as_ref().map(|c| c.deep_copy()).transpose())
                .collect::<candle_core::Result<_>>()?,
            pad: self.pad.clone(),
            next_position: self.next_position.clone(),
        })
    }
}

/// What every forward needs, checked and prepared from [`Inputs`].
struct Prepared {
    /// `[B, T, H]`, image rows in place.
    embeds: Tensor,
    /// `[3, B, T]`.
    positions: Tensor,
    /// `[B, T]` additive F32.
    pad: Tensor,
    /// Host copies for decoding: the mask (nonzero = real) and the positions.
    mask: Vec<Vec<u32>>,
    host_positions: Vec<i64>,
}

/// Qwen2-VL for conditional generation: vision tower, decoder, LM head.
#[derive(Debug, Clone)]
pub struct Qwen2Vl {
    cfg: Config,
    visual: VisionModel,
    model: TextModel,
    /// `None` when tied to the token embedding.
    lm_head: Option<Tensor>,
    checkpointing: Checkpointing,
    store: CheckpointGrads,
}

impl Qwen2Vl {
    /// The model with its weights under `vb` by the Hub's names (`visual.*`,
    /// `model.*`, `lm_head.weight` unless `tie_word_embeddings`), in `vb`'s
    /// dtype (F32 or BF16). From a `VarMap` the weights are trainable `Var`s.
    pub fn new(cfg: &Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let visual = VisionModel::new(&cfg.vision, vb.pp("visual"))?;
        let model = TextModel::new(&cfg.text, vb.pp("model"))?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let init = Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            };
            let shape = (cfg.text.vocab_size, cfg.text.hidden_size);
            Some(vb.pp("lm_head").get_with_hints(shape, "weight", init)?)
        };
        Ok(Self {
            cfg: cfg.clone(),
            visual,
            model,
            lm_head,
            checkpointing: Checkpointing::default(),
            store: CheckpointGrads::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Turns gradient checkpointing on or off per tower. While on, take
    /// gradients with [`Qwen2Vl::backward`].
    pub fn set_checkpointing(&mut self, checkpointing: Checkpointing) {
        self.checkpointing = checkpointing;
    }

    /// Which blocks are checkpointed.
    pub fn checkpointing(&self) -> Checkpointing {
        self.checkpointing
    }

    /// `loss.backward()`, plus the gradients of the checkpointed blocks'
    /// weights (which candle's backward leaves in a side store; see
    /// `checkpoint.rs`). Without checkpointing it is `loss.backward()`.
    /// With checkpointing, take gradients through this (or
    /// [`Qwen2Vl::collect_checkpoint_grads`]), not `loss.backward()` or
    /// `Optimizer::backward_step`: the next forward refuses to run while
    /// collected gradients wait ([`Error::UncollectedGradients`]).
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        self.collect_checkpoint_grads(&mut grads)?;
        Ok(grads)
    }

    /// Adds the checkpointed blocks' weight gradients, which the last
    /// backward left in the side store, to `grads` (from `loss.backward()`),
    /// and empties the store.
    pub fn collect_checkpoint_grads(&self, grads: &mut GradStore) -> Result<()> {
        Ok(self.store.merge_into(grads)?)
    }

    /// The LM head `[vocab, H]`: `lm_head.weight`, or the token embedding when tied.
    pub fn lm_head_weight(&self) -> Tensor {
        self.lm_head
            .clone()
            .unwrap_or_else(|| self.model.embed_tokens.clone())
    }

    /// The vision tower's merged tokens `[sum(t h w) / merge^2, hidden_size]`
    /// of `pixel_values` `[sum(t h w), C*T*P*P]` (images in order).
    pub fn vision_embeds(&self, pixel_values: &Tensor, image_grid_thw: &[[usize; 3]]) -> Result<Tensor> {
        let v = &self.cfg.vision;
        let mut patches = 0;
        for (i, &g) in image_grid_thw.iter().enumerate() {
            rope::merged_grid(i, g, v.spatial_merge_size)?;
            patches += g[0] * g[1] * g[2];
        }
        check_float("pixel_values", pixel_values)?;
        let found = pixel_values.dims();
        if found.len() != 2 || found[1] != v.patch_dim() {
            return Err(Error::Shape {
                what: "pixel_values",
                expected: format!("[patches, {}]", v.patch_dim()),
                found: found.to_vec(),
            });
        }
        if found[0] != patches || patches == 0 {
            return Err(Error::Pixels {
                found: found[0],
                expected: patches,
            });
        }
        let store = self.checkpointing.vision.then_some(&self.store);
        Ok(self.visual.forward(pixel_values, image_grid_thw, store)?)
    }

    /// The M-RoPE position ids and rope deltas of `input` (its mask and grids).
    pub fn rope_index(&self, input: &Inputs) -> Result<RopeIndex> {
        let ids = self.host_ids(&input.input_ids)?;
        let mask = self.host_mask(input.attention_mask.as_ref(), ids.len(), ids[0].len())?;
        Ok(get_rope_index(
            &self.cfg,
            &ids,
            mask.as_deref(),
            &input.image_grid_thw,
        )?)
    }

    /// Hidden states after the final norm, `[B, T, H]`.
    pub fn hidden_states(&self, input: &Inputs) -> Result<Tensor> {
        self.hidden_states_with(input, None)
    }

    /// [`Qwen2Vl::hidden_states`] with the images' merged tokens given
    /// (`[image tokens, hidden_size]`, from [`Qwen2Vl::vision_embeds`], in
    /// prompt order across the batch) instead of computed from
    /// `input.pixel_values`, which must then be `None`; `input.image_grid_thw`
    /// still gives every image's grid (for the positions). This lets one
    /// image serve several rows while the vision tower runs once for it
    /// (GRPO's `G` completions of a prompt): repeat its rows of the vision
    /// output, and the gradients of the repeats add up in the tower.
    pub fn hidden_states_with_image_embeds(&self, input: &Inputs, image_embeds: &Tensor) -> Result<Tensor> {
        self.hidden_states_with(input, Some(image_embeds))
    }

    fn hidden_states_with(&self, input: &Inputs, image_embeds: Option<&Tensor>) -> Result<Tensor> {
        let p = self.prepare(input, image_embeds)?;
        let store = self.checkpointing.text.then_some(&self.store);
        Ok(self.model.forward(&p.embeds, &p.positions, &p.pad, None, store)?)
    }

    /// Logits `[B, T, vocab]` (for tests and inspection: training uses
    /// [`Qwen2Vl::token_logprobs`], which never holds them).
    pub fn logits(&self, input: &Inputs) -> Result<Tensor> {
        Ok(self
            .hidden_states(input)?
            .broadcast_matmul(&self.lm_head_weight().t()?)?)
    }

    /// Log-probs `[B, T - 1]` of each next token, `input_ids[:, t + 1]` given
    /// the tokens up to `t` (transformers' shifted labels), from the hidden
    /// states through `fused_linear_logprobs` with `cfg` (temperature,
    /// entropy, chunking). `mask` `[B, T - 1]` U8 picks the targets (0 = not
    /// scored: log-prob 0, no gradient); by default `attention_mask[:, 1:]`.
    pub fn token_logprobs(
        &self,
        input: &Inputs,
        mask: Option<&Tensor>,
        cfg: &FusedLinearConfig,
    ) -> Result<LogProbTensors> {
        let (b, t) = dims2("input_ids", &input.input_ids)?;
        if t < 2 {
            return Err(Error::Shape {
                what: "input_ids",
                expected: "[B, T] with T >= 2".into(),
                found: vec![b, t],
            });
        }
        if let Some(m) = mask {
            if m.dtype() != DType::U8 {
                return Err(Error::Dtype {
                    what: "mask",
                    expected: "U8",
                    found: m.dtype(),
                });
            }
            if m.dims() != [b, t - 1] {
                return Err(Error::Shape {
                    what: "mask",
                    expected: format!("[{b}, {}]", t - 1),
                    found: m.dims().to_vec(),
                });
            }
        }
        // hidden_states checks the rest of the input (the attention mask's shape too).
        let hidden = self.hidden_states(input)?.narrow(1, 0, t - 1)?;
        let default_mask = match (mask, &input.attention_mask) {
            (None, Some(am)) => Some(am.narrow(1, 1, t - 1)?.ne(0f64)?.contiguous()?),
            _ => None,
        };
        let targets = input.input_ids.narrow(1, 1, t - 1)?.contiguous()?;
        let mask = mask.or(default_mask.as_ref());
        Ok(fused_linear_logprobs(
            &hidden,
            &self.lm_head_weight(),
            &targets,
            mask,
            cfg,
        )?)
    }

    /// Runs the prompt `input` (no checkpointing) and returns the cache for
    /// [`Qwen2Vl::decode_step`] with the logits `[B, vocab]` at each row's
    /// last real token. Detached: for generation.
    pub fn prefill(&self, input: &Inputs) -> Result<(KvCache, Tensor)> {
        let p = self.prepare(input, None)?;
        let mut layers: Vec<LayerKv> = (0..self.model.num_layers()).map(|_| None).collect();
        let hidden = self
            .model
            .forward(&p.embeds, &p.positions, &p.pad, Some(&mut layers), None)?;
        let (b, t, _) = hidden.dims3()?;
        let mut last = Vec::with_capacity(b);
        let mut next_position = Vec::with_capacity(b);
        for (row, m) in p.mask.iter().enumerate() {
            let real: Vec<usize> = (0..t).filter(|&i| m[i] != 0).collect();
            let Some(&end) = real.last() else {
                return Err(RopeError::EmptyRow { row }.into());
            };
            last.push((row * t + end) as u32);
            let max = (0..3)
                .flat_map(|axis| real.iter().map(move |&i| (axis * b + row) * t + i))
                .map(|k| p.host_positions[k])
                .max()
                .unwrap_or(0);
            next_position.push(max + 1);
        }
        let idx = Tensor::from_vec(last, b, hidden.device())?;
        let h = hidden.reshape((b * t, ()))?.index_select(&idx, 0)?;
        let logits = h.matmul(&self.lm_head_weight().t()?)?.detach();
        let cache = KvCache {
            layers,
            pad: p.pad.detach(),
            next_position,
        };
        Ok((cache, logits))
    }

    /// Appends one token per row (`tokens` `[B]` U32) to `cache` and returns
    /// the next-token logits `[B, vocab]`. Each row's token takes position
    /// `cache.next_positions()[row]` on all three M-RoPE axes. Detached.
    pub fn decode_step(&self, cache: &mut KvCache, tokens: &Tensor) -> Result<Tensor> {
        let b = cache.next_position.len();
        if tokens.dims() != [b] {
            return Err(Error::Shape {
                what: "tokens",
                expected: format!("[{b}] (the cached batch)"),
                found: tokens.dims().to_vec(),
            });
        }
        self.host_ids(&tokens.reshape((b, 1))?)?;
        let dev = tokens.device();
        let embeds = self.model.embed(&tokens.reshape((b, 1))?)?;
        let positions = Tensor::from_vec(cache.next_position.repeat(3), (3, b, 1), dev)?;
        let pad = Tensor::cat(&[&cache.pad, &Tensor::zeros((b, 1), DType::F32, dev)?], 1)?;
        let hidden = self
            .model
            .forward(&embeds, &positions, &pad, Some(&mut cache.layers), None)?;
        cache.pad = pad;
        cache.next_position.iter_mut().for_each(|p| *p += 1);
        Ok(hidden.squeeze(1)?.matmul(&self.lm_head_weight().t()?)?.detach())
    }

    /// `input_ids` on the host, checked: `[B, T]` U32 (`B, T >= 1`), ids below the vocabulary.
    fn host_ids(&self, input_ids: &Tensor) -> Result<Vec<Vec<u32>>> {
        if input_ids.dtype() != DType::U32 {
            return Err(Error::Dtype {
                what: "input_ids",
                expected: "U32",
                found: input_ids.dtype(),
            });
        }
        let (b, t) = dims2("input_ids", input_ids)?;
        if b == 0 || t == 0 {
            return Err(Error::Shape {
                what: "input_ids",
                expected: "[B, T] with B, T >= 1".into(),
                found: vec![b, t],
            });
        }
        let ids = input_ids.to_vec2::<u32>()?;
        let vocab = self.cfg.text.vocab_size;
        for (row, r) in ids.iter().enumerate() {
            if let Some(pos) = r.iter().position(|&id| id as usize >= vocab) {
                return Err(Error::TokenId {
                    row,
                    pos,
                    id: r[pos],
                    vocab,
                });
            }
        }
        Ok(ids)
    }

    /// The mask on the host (nonzero = real), checked to be `[b, t]`.
    fn host_mask(&self, mask: Option<&Tensor>, b: usize, t: usize) -> Result<Option<Vec<Vec<u32>>>> {
        let Some(m) = mask else { return Ok(None) };
        if m.dims() != [b, t] {
            return Err(Error::Shape {
                what: "attention_mask",
                expected: format!("[{b}, {t}] (as input_ids)"),
                found: m.dims().to_vec(),
            });
        }
        Ok(Some(m.ne(0f64)?.to_dtype(DType::U32)?.to_vec2::<u32>()?))
    }

    /// Checks `input` and builds the embeddings (images in place: the
    /// vision tower's output of `input.pixel_values`, or `image_embeds`),
    /// positions and mask.
    fn prepare(&self, input: &Inputs, image_embeds: Option<&Tensor>) -> Result<Prepared> {
        let pending = self.store.pending();
        if pending > 0 {
            return Err(Error::UncollectedGradients { pending });
        }
        let ids = self.host_ids(&input.input_ids)?;
        let (b, t) = (ids.len(), ids[0].len());
        let dev = input.input_ids.device();
        let mask = self.host_mask(input.attention_mask.as_ref(), b, t)?;
        let image = self.cfg.image_token_id;
        let image_tokens = ids.iter().flatten().filter(|&&id| id == image).count();
        let merge = self.cfg.vision.merge_unit();
        let expected: usize = input
            .image_grid_thw
            .iter()
            .map(|g| g[0] * g[1] * g[2] / merge)
            .sum();
        if image_tokens != expected {
            return Err(Error::ImageTokens {
                found: image_tokens,
                expected,
            });
        }
        let mut embeds = self.model.embed(&input.input_ids)?;
        let patches: usize = input.image_grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let rows_of = |px: &Tensor| px.dims().first().copied().unwrap_or(0);
        let vision = match (image_embeds, &input.pixel_values) {
            (Some(_), Some(px)) => {
                return Err(Error::Shape {
                    what: "pixel_values",
                    expected: "absent when the image embeddings are given".into(),
                    found: px.dims().to_vec(),
                })
            }
            (Some(given), None) => {
                let h = self.cfg.text.hidden_size;
                if given.dims() != [expected, h] {
                    return Err(Error::Shape {
                        what: "image_embeds",
                        expected: format!("[{expected}, {h}] (the grids' merged tokens)"),
                        found: given.dims().to_vec(),
                    });
                }
                (expected > 0).then(|| given.clone())
            }
            (None, Some(px)) if patches > 0 => Some(self.vision_embeds(px, &input.image_grid_thw)?),
            (None, None) if patches == 0 => None,
            (None, px) => {
                return Err(Error::Pixels {
                    found: px.as_ref().map_or(0, rows_of),
                    expected: patches,
                })
            }
        };
        if let Some(vis) = vision {
            let vis = vis.to_dtype(embeds.dtype())?;
            // Row k of [embeds; vis]: the k-th token's embedding, or for
            // the j-th image token, vision token j (B*T + j).
            let mut next = b * t;
            let index: Vec<u32> = ids
                .iter()
                .flatten()
                .enumerate()
                .map(|(k, &id)| {
                    if id == image {
                        next += 1;
                        (next - 1) as u32
                    } else {
                        k as u32
                    }
                })
                .collect();
            let h = embeds.dim(2)?;
            let rows = Tensor::cat(&[&embeds.reshape((b * t, h))?, &vis], 0)?;
            embeds = rows
                .index_select(&Tensor::from_vec(index, b * t, dev)?, 0)?
                .reshape((b, t, h))?;
        }
        let (positions, host_positions) = match &input.position_ids {
            Some(p) => {
                if p.dims() != [3, b, t] || !p.dtype().is_int() {
                    return Err(Error::Shape {
                        what: "position_ids",
                        expected: format!("[3, {b}, {t}] of an integer dtype"),
                        found: p.dims().to_vec(),
                    });
                }
                let host = p.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
                (p.clone(), host)
            }
            None => {
                let ix = get_rope_index(&self.cfg, &ids, mask.as_deref(), &input.image_grid_thw)?;
                (ix.to_tensor(dev)?, ix.positions)
            }
        };
        let mask = mask.unwrap_or_else(|| vec![vec![1; t]; b]);
        let pad: Vec<f32> = mask
            .iter()
            .flatten()
            .map(|&m| if m != 0 { 0.0 } else { MASKED })
            .collect();
        Ok(Prepared {
            embeds,
            positions,
            pad: Tensor::from_vec(pad, (b, t), dev)?,
            mask,
            host_positions,
        })
    }
}

fn dims2(what: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| Error::Shape {
        what,
        expected: "[B, T]".into(),
        found: t.dims().to_vec(),
    })
}

fn check_float(what: &'static str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => Ok(()),
        found => Err(Error::Dtype {
            what,
            expected: "a float dtype",
            found,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;

    /// A tiny Qwen2-VL in the fixture's shape (QWEN2VL.md §2) with a
    /// 128-token vocabulary whose last ids are the specials.
    pub(crate) fn tiny_config(tied: bool) -> Config {
        Config {
            text: TextConfig {
                vocab_size: 128,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                rms_norm_eps: 1e-6,
                rope_theta: 1e6,
                mrope_section: vec![2, 3, 3],
                max_position_embeddings: 4096,
            },
            vision: VisionConfig {
                depth: 2,
                embed_dim: 32,
                hidden_size: 64,
                num_heads: 4,
                ..VisionConfig::default()
            },
            image_token_id: 120,
            video_token_id: 121,
            vision_start_token_id: 118,
            vision_end_token_id: 119,
            tie_word_embeddings: tied,
            bos_token_id: None,
            eos_token_id: vec![117],
            dtype: None,
        }
    }

    /// SplitMix64 normals (Box-Muller) for reproducible test weights
    /// (candle's CPU RNG cannot be seeded).
    pub(crate) fn normals(n: usize, seed: u64, std: f32) -> Vec<f32> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (next().max(1e-300), next());
                (std as f64 * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    /// Sets every variable to reproducible random values (norm scales
    /// around 1, everything else around 0) so that no weight is trivial.
    pub(crate) fn randomize(vm: &VarMap, seed: u64) {
        let data = vm.data().lock().unwrap();
        for (name, var) in data.iter() {
            let key = name
                .bytes()
                .fold(seed, |h, c| h.wrapping_mul(31).wrapping_add(c as u64));
            let n = var.elem_count();
            let is_norm = name.contains("norm") || name.contains("ln_q");
            let mut vals = normals(n, key, if is_norm { 0.2 } else { 0.3 });
            if is_norm && name.ends_with("weight") {
                vals.iter_mut().for_each(|v| *v += 1.0);
            }
            let t = Tensor::from_vec(vals, var.shape(), var.device()).unwrap();
            var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `max |a - b| <= tol * max(1, max |b|)`: f32 rounding grows with the values' scale.
    pub(crate) fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let scale = max_abs_diff(b, &b.zeros_like().unwrap()).max(1.0);
        let d = max_abs_diff(a, b);
        assert!(d <= tol * scale, "{what}: max |diff| {d} > {tol} * {scale}");
    }

    const IMG: u32 = 120;
    const VS: u32 = 118;
    const VE: u32 = 119;

    fn model(tied: bool) -> (Qwen2Vl, VarMap) {
        let vm = VarMap::new();
        let m = Qwen2Vl::new(
            &tiny_config(tied),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        randomize(&vm, 11);
        (m, vm)
    }

    fn patches(n: usize, seed: u64) -> Tensor {
        Tensor::from_vec(normals(n * 1176, seed, 1.0), (n, 1176), &Device::Cpu).unwrap()
    }

    /// `text, <vision_start>, n image tokens, <vision_end>, more`.
    fn row(text: &[u32], n: usize, more: &[u32]) -> Vec<u32> {
        let mut r = text.to_vec();
        r.push(VS);
        r.extend(std::iter::repeat_n(IMG, n));
        r.push(VE);
        r.extend_from_slice(more);
        r
    }

    /// Row 0: a 2x4-patch image (2 tokens), 9 tokens. Row 1: a 2x2 image (1
    /// token), 5 tokens, right-padded to 9.
    fn rows() -> (Vec<u32>, Vec<u32>) {
        (row(&[1, 2], 2, &[3, 4, 5]), row(&[6], 1, &[7]))
    }

    fn padded_batch() -> Inputs {
        padded_batch_on(false)
    }

    /// [`rows`] as a batch, row 1 padded on the left or the right.
    fn padded_batch_on(left: bool) -> Inputs {
        let (r0, r1) = rows();
        let (n, n1) = (r0.len(), r1.len());
        let pads = std::iter::repeat_n(0, n - n1);
        let (r1, mask): (Vec<u32>, Vec<u32>) = if left {
            (
                pads.chain(r1).collect(),
                (0..n).map(|i| u32::from(i >= n - n1)).collect(),
            )
        } else {
            (
                r1.into_iter().chain(pads).collect(),
                (0..n).map(|i| u32::from(i < n1)).collect(),
            )
        };
        let dev = Device::Cpu;
        Inputs {
            input_ids: Tensor::new(vec![r0.clone(), r1], &dev).unwrap(),
            attention_mask: Some(Tensor::new(vec![vec![1u32; r0.len()], mask], &dev).unwrap()),
            pixel_values: Some(Tensor::cat(&[patches(8, 1), patches(4, 2)], 0).unwrap()),
            image_grid_thw: vec![[1, 2, 4], [1, 2, 2]],
            position_ids: None,
        }
    }

    /// One unpadded row with its own image.
    fn single(ids: Vec<u32>, pixels: Tensor, grid: [usize; 3]) -> Inputs {
        Inputs {
            input_ids: Tensor::new(vec![ids], &Device::Cpu).unwrap(),
            attention_mask: None,
            pixel_values: Some(pixels),
            image_grid_thw: vec![grid],
            position_ids: None,
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for tied in [false, true] {
            let (m, vm) = model(tied);
            let lp = m
                .token_logprobs(&padded_batch(), None, &FusedLinearConfig::default())
                .unwrap();
            assert_eq!(lp.logp.dims(), &[2, 8]);
            let grads = m.backward(&lp.logp.sum_all().unwrap()).unwrap();
            let vars = vm.data().lock().unwrap();
            assert_eq!(vars.contains_key("lm_head.weight"), !tied);
            for (name, v) in vars.iter() {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                assert!(
                    max_abs_diff(g, &g.zeros_like().unwrap()) > 0.0,
                    "{name}: zero gradient"
                );
            }
        }
    }

    /// Prefill of a padded batch with images, then decoding, equals full
    /// forwards of each row alone: the cache, the padding mask and the rope
    /// deltas carried into decoding.
    #[test]
    fn decoding_equals_full_forwards_of_each_row() {
        let (m, _vm) = model(false);
        let (r0, r1) = rows();
        let steps: [[u32; 2]; 3] = [[10, 11], [12, 13], [14, 15]];
        for left in [false, true] {
            let (mut cache, mut logits) = m.prefill(&padded_batch_on(left)).unwrap();
            assert_eq!((cache.len(), logits.dims()), (9, &[2usize, 128][..]));
            // Row 0: text positions 0-2, image at 3 (1x2 tokens), text resumes at 5: 9 tokens end at 8.
            // Row 1: 0-1, image at 2 (1 token), 3-4: next 5.
            assert_eq!(cache.next_positions(), &[9, 5]);
            let mut per_step = vec![logits.clone()];
            for tokens in steps {
                logits = m
                    .decode_step(&mut cache, &Tensor::new(&tokens, &Device::Cpu).unwrap())
                    .unwrap();
                per_step.push(logits.clone());
            }
            assert_eq!(cache.next_positions(), &[12, 8]);
            assert!(!per_step[1].track_op(), "decoding keeps no graph");
            let alone = [(&r0, patches(8, 1), [1, 2, 4]), (&r1, patches(4, 2), [1, 2, 2])];
            for (b, (ids, px, grid)) in alone.into_iter().enumerate() {
                let mut full = ids.clone();
                full.extend(steps.iter().map(|s| s[b]));
                let want = m.logits(&single(full, px, grid)).unwrap().squeeze(0).unwrap();
                for (k, got) in per_step.iter().enumerate() {
                    let want = want.get(ids.len() - 1 + k).unwrap();
                    let what = format!("left {left}, row {b}, step {k}");
                    assert_close(&got.get(b).unwrap(), &want, 1e-5, &what);
                }
            }
        }
    }

    /// Teacher-forced logits of a padded row, on either side, equal the
    /// row's alone at its real positions (transformers' position ids skip
    /// the padding).
    #[test]
    fn padding_on_either_side_keeps_each_rows_logits() {
        let (m, _vm) = model(false);
        let (_, r1) = rows();
        let want = m.logits(&single(r1.clone(), patches(4, 2), [1, 2, 2])).unwrap();
        for left in [false, true] {
            let got = m.logits(&padded_batch_on(left)).unwrap().get(1).unwrap();
            let start = if left { 9 - r1.len() } else { 0 };
            let got = got.narrow(0, start, r1.len()).unwrap();
            assert_close(&got, &want.squeeze(0).unwrap(), 1e-5, &format!("left {left}"));
        }
    }

    /// A prompt's cache computed once and repeated decodes as the prompt
    /// repeated in the batch, and dropping rows leaves the others' logits.
    #[test]
    fn a_repeated_cache_decodes_as_repeated_prompts() {
        let (m, _vm) = model(false);
        let once = padded_batch_on(true);
        let (cache, logits) = m.prefill(&once).unwrap();
        let mut shared = cache.repeat_interleave(2).unwrap();
        shared.reserve(4).unwrap();
        let index = Tensor::new(&[0u32, 0, 1, 1], &Device::Cpu).unwrap();
        let mut shared_logits = logits.index_select(&index, 0).unwrap();
        // The same prompts, each twice in the batch, its image encoded twice.
        let ids = once.input_ids.to_vec2::<u32>().unwrap();
        let mask = once.attention_mask.as_ref().unwrap().to_vec2::<u32>().unwrap();
        let twice = |v: &[Vec<u32>]| v.iter().flat_map(|r| [r.clone(), r.clone()]).collect::<Vec<_>>();
        let (p0, p1) = (patches(8, 1), patches(4, 2));
        let repeated = Inputs {
            input_ids: Tensor::new(twice(&ids), &Device::Cpu).unwrap(),
            attention_mask: Some(Tensor::new(twice(&mask), &Device::Cpu).unwrap()),
            pixel_values: Some(Tensor::cat(&[&p0, &p0, &p1, &p1], 0).unwrap()),
            image_grid_thw: vec![[1, 2, 4], [1, 2, 4], [1, 2, 2], [1, 2, 2]],
            position_ids: None,
        };
        let (mut plain, mut plain_logits) = m.prefill(&repeated).unwrap();
        assert_eq!(shared.next_positions(), plain.next_positions());
        // f32 rounding only: the two batches differ in size, and gemm's
        // AVX-512 kernels block (so round) by the matrices' shapes; measured
        // 1.6e-6 of the logits' scale. A wrong cache entry or position moves
        // logits by a good fraction of it.
        let tol = 1e-5;
        for tokens in [[10u32, 11, 12, 13], [14, 15, 16, 17], [18, 19, 20, 21]] {
            assert_close(&shared_logits, &plain_logits, tol, "shared vs repeated");
            let tokens = Tensor::new(&tokens, &Device::Cpu).unwrap();
            shared_logits = m.decode_step(&mut shared, &tokens).unwrap();
            plain_logits = m.decode_step(&mut plain, &tokens).unwrap();
        }
        assert_close(&shared_logits, &plain_logits, tol, "shared vs repeated");
        // Rows 1 and 2 alone, then one more step: as the full batch's rows.
        let mut kept = shared.select_rows(&[1, 2]).unwrap();
        assert_eq!(kept.next_positions(), &shared.next_positions()[1..3]);
        let next = m
            .decode_step(&mut kept, &Tensor::new(&[5u32, 6], &Device::Cpu).unwrap())
            .unwrap();
        let all = m
            .decode_step(&mut shared, &Tensor::new(&[1u32, 5, 6, 2], &Device::Cpu).unwrap())
            .unwrap();
        assert_close(&next, &all.narrow(0, 1, 2).unwrap(), tol, "selected rows");
        assert!(shared.select_rows(&[4]).is_err());
    }

    /// The vision tower's output given in place of the pixels gives the
    /// same hidden states; repeated for several rows, the tower runs once
    /// and its weights get the repeats' gradients.
    #[test]
    fn given_image_embeds_equal_computed_ones() {
        let (m, vm) = model(false);
        let input = padded_batch();
        let vis = m
            .vision_embeds(input.pixel_values.as_ref().unwrap(), &input.image_grid_thw)
            .unwrap();
        let given = Inputs {
            pixel_values: None,
            ..input.clone()
        };
        let a = m.hidden_states(&input).unwrap();
        let b = m.hidden_states_with_image_embeds(&given, &vis).unwrap();
        assert_close(&b, &a, 0.0, "hidden states");
        let grads = m.backward(&b.sum_all().unwrap()).unwrap();
        let qkv = vm.data().lock().unwrap()["visual.blocks.0.attn.qkv.weight"].clone();
        assert!(grads.get(&qkv).is_some(), "the tower gets gradients");
        let e = m.hidden_states_with_image_embeds(&input, &vis).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Shape {
                    what: "pixel_values",
                    ..
                }
            ),
            "{e}"
        );
        let e = m
            .hidden_states_with_image_embeds(&given, &vis.narrow(0, 0, 2).unwrap())
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Shape {
                    what: "image_embeds",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn given_position_ids_equal_computed_ones() {
        let (m, _vm) = model(false);
        let input = padded_batch();
        let ix = m.rope_index(&input).unwrap();
        let given = Inputs {
            position_ids: Some(ix.to_tensor(&Device::Cpu).unwrap()),
            ..input.clone()
        };
        assert_close(
            &m.logits(&given).unwrap(),
            &m.logits(&input).unwrap(),
            0.0,
            "logits",
        );
    }

    #[test]
    fn uncollected_checkpoint_gradients_stop_the_next_forward() {
        let (mut m, _vm) = model(false);
        m.set_checkpointing(Checkpointing {
            text: true,
            vision: true,
        });
        let input = padded_batch();
        m.hidden_states(&input)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let e = m.hidden_states(&input).unwrap_err();
        assert!(
            matches!(e, Error::UncollectedGradients { pending } if pending > 0),
            "{e}"
        );
        // Collecting them (here into a throwaway store) lets the model run again.
        let mut grads = Tensor::zeros(1, DType::F32, &Device::Cpu)
            .unwrap()
            .backward()
            .unwrap();
        m.collect_checkpoint_grads(&mut grads).unwrap();
        assert!(m.hidden_states(&input).is_ok());
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let (m, _vm) = model(false);
        let dev = Device::Cpu;
        let ok = padded_batch();
        let run = |input: Inputs| m.hidden_states(&input).unwrap_err();
        let with = |f: &dyn Fn(&mut Inputs)| {
            let mut i = ok.clone();
            f(&mut i);
            run(i)
        };
        let e = with(&|i| i.input_ids = i.input_ids.to_dtype(DType::F32).unwrap());
        assert!(
            matches!(
                e,
                Error::Dtype {
                    what: "input_ids",
                    ..
                }
            ),
            "{e}"
        );
        let e = run(Inputs::text(Tensor::new(&[1u32, 2], &dev).unwrap()));
        assert!(
            matches!(
                e,
                Error::Shape {
                    what: "input_ids",
                    ..
                }
            ),
            "{e}"
        );
        let e = run(Inputs::text(Tensor::new(&[[1u32, 128]], &dev).unwrap()));
        assert!(
            matches!(
                e,
                Error::TokenId {
                    row: 0,
                    pos: 1,
                    id: 128,
                    vocab: 128
                }
            ),
            "{e}"
        );
        let e = with(&|i| i.attention_mask = Some(Tensor::ones((2, 3), DType::U8, &dev).unwrap()));
        assert!(
            matches!(
                e,
                Error::Shape {
                    what: "attention_mask",
                    ..
                }
            ),
            "{e}"
        );
        let e = with(&|i| {
            i.pixel_values = None;
            i.image_grid_thw.clear();
        });
        assert!(
            matches!(
                e,
                Error::ImageTokens {
                    found: 3,
                    expected: 0
                }
            ),
            "{e}"
        );
        let e = with(&|i| i.pixel_values = None);
        assert!(
            matches!(
                e,
                Error::Pixels {
                    found: 0,
                    expected: 12
                }
            ),
            "{e}"
        );
        let e = with(&|i| i.pixel_values = Some(patches(11, 3)));
        assert!(
            matches!(
                e,
                Error::Pixels {
                    found: 11,
                    expected: 12
                }
            ),
            "{e}"
        );
        let e = with(&|i| i.pixel_values = Some(Tensor::zeros((12, 1175), DType::F32, &dev).unwrap()));
        assert!(
            matches!(
                e,
                Error::Shape {
                    what: "pixel_values",
                    ..
                }
            ),
            "{e}"
        );
        let e = with(&|i| i.pixel_values = Some(Tensor::zeros((12, 1176), DType::U32, &dev).unwrap()));
        assert!(
            matches!(
                e,
                Error::Dtype {
                    what: "pixel_values",
                    ..
                }
            ),
            "{e}"
        );
        let e = with(&|i| i.image_grid_thw = vec![[1, 2, 4], [1, 1, 4]]);
        assert!(matches!(e, Error::Rope(RopeError::Grid { index: 1, .. })), "{e}");
        let e = with(&|i| i.image_grid_thw = vec![[1, 2, 2], [1, 2, 4]]);
        assert!(
            matches!(e, Error::Rope(RopeError::BlockLength { row: 0, .. })),
            "{e}"
        );
        let e = with(&|i| i.position_ids = Some(Tensor::zeros((3, 2, 8), DType::I64, &dev).unwrap()));
        assert!(
            matches!(
                e,
                Error::Shape {
                    what: "position_ids",
                    ..
                }
            ),
            "{e}"
        );
        let bad_mask = Tensor::ones((2, 8), DType::U32, &dev).unwrap();
        let e = m
            .token_logprobs(&ok, Some(&bad_mask), &FusedLinearConfig::default())
            .unwrap_err();
        assert!(matches!(e, Error::Dtype { what: "mask", .. }), "{e}");
        let (mut cache, _) = m.prefill(&ok).unwrap();
        let e = m
            .decode_step(&mut cache, &Tensor::new(&[1u32], &dev).unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::Shape { what: "tokens", .. }), "{e}");
        let e = m
            .decode_step(&mut cache, &Tensor::new(&[1u32, 999], &dev).unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::TokenId { row: 1, id: 999, .. }), "{e}");
        // Errors convert into candle's, and come back out typed.
        let c: candle_core::Error = e.into();
        assert!(c.to_string().contains("999"), "{c}");
    }
}
