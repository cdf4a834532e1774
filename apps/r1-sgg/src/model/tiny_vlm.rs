//! A small vision-language model in the shape of Qwen2-VL, scaled down to
//! train on a laptop: a ViT over image patches (optionally cut from the
//! features of a convolution, see [`PixelStem`]), a 2-layer MLP projector into
//! the LM width, and a decoder-only LM (RMSNorm, RoPE attention, SwiGLU)
//! reading `[image tokens][text tokens]`. The LM head is an untied `[V, H]`
//! weight so training can call the crate's fused linear log-prob op on
//! `(hidden states, lm_head.weight)` instead of materializing logits.
//!
//! Every op has a backward: norms, RoPE and softmax come from
//! `grpo_kernels::candle::nn` (candle-nn's fast versions have none).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d, linear_no_bias, Conv2d, Conv2dConfig, Init, Linear, VarBuilder};
use grpo_kernels::candle::nn::{rope, rope_tables, softmax_last_dim, RmsNorm};
use serde::{Deserialize, Serialize};

/// Sizes of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VlmConfig {
    /// Input images are `image_size x image_size` RGB.
    pub image_size: usize,
    /// Side of a square patch (one image token each).
    pub patch_size: usize,
    /// Per-pixel features computed before the patches are cut, if any.
    #[serde(default)]
    pub stem: Option<PixelStem>,
    pub vit_dim: usize,
    pub vit_layers: usize,
    pub vit_heads: usize,
    pub lm_dim: usize,
    pub lm_layers: usize,
    pub lm_heads: usize,
    /// MLP width as a multiple of the model width.
    pub mlp_ratio: usize,
    pub vocab_size: usize,
    /// Longest `[image][text]` sequence (RoPE table length).
    pub max_positions: usize,
    pub rope_theta: f64,
    /// The box-coordinate tokens, if the vocabulary has them: see [`NumberTokens`].
    #[serde(default)]
    pub numbers: Option<NumberTokens>,
}

/// A contiguous run of token ids that stand for the integers `0..count`
/// (the box coordinates `0..=1000`). Their LM-head rows and embeddings get,
/// on top of a free row each, a component that is a smooth function of the
/// value: `C[n] @ A` with `C[n] = cos(pi k (n + 1/2) / count)`, `k < basis`
/// (a DCT-II basis) and `A` `[basis, H]` learned. What one example teaches
/// about "328" then moves "312" and "344" too, so a small model learns
/// coordinates as quantities rather than as 1001 unrelated classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberTokens {
    /// Token id of the value 0.
    pub first: usize,
    /// Number of values (`1001` for box coordinates).
    pub count: usize,
    /// Basis functions (resolution: about `count / basis` values).
    pub basis: usize,
}

/// A convolution with GELU over the image, ahead of the patch embedding:
/// each patch is then embedded from `channels` learned features per pixel
/// instead of raw RGB. The patch embedding is linear, so without a stem it
/// cannot threshold a shape's colour against the noisy background pixel by
/// pixel; with one, where an object's edge falls inside a patch becomes a
/// linear read-out, which is what box coordinates need. The example's
/// `--pixel-stem` flag adds one (3x3). On the demo's data (the fifth sweep,
/// rows of `bench/data/r1_sgg.csv`) a 16-channel 3x3 stem
/// lowered the SFT loss in every run, but recall moved both ways from run
/// to run, so the tiny preset does not use one by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelStem {
    /// Features per pixel.
    pub channels: usize,
    /// Odd kernel side: 1 looks at each pixel alone, 3 at its neighbours too.
    pub kernel: usize,
}

impl VlmConfig {
    /// About 1M parameters: trains on two CPU cores in minutes.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            image_size: 64,
            patch_size: 8,
            stem: None,
            vit_dim: 64,
            vit_layers: 2,
            vit_heads: 4,
            lm_dim: 128,
            lm_layers: 3,
            lm_heads: 4,
            mlp_ratio: 3,
            vocab_size,
            max_positions: 512,
            rope_theta: 10_000.0,
            numbers: None,
        }
    }

    /// About 30M parameters, for a GPU.
    pub fn gpu(vocab_size: usize) -> Self {
        Self {
            image_size: 64,
            patch_size: 4,
            stem: None,
            vit_dim: 256,
            vit_layers: 4,
            vit_heads: 8,
            lm_dim: 512,
            lm_layers: 8,
            lm_heads: 8,
            mlp_ratio: 4,
            vocab_size,
            max_positions: 1024,
            rope_theta: 10_000.0,
            numbers: None,
        }
    }

    /// Image tokens per image.
    pub fn image_tokens(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// Multi-head attention with optional RoPE and a KV cache.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: linear_no_bias(dim, 3 * dim, vb.pp("qkv"))?,
            out: linear_no_bias(dim, dim, vb.pp("out"))?,
            heads,
        })
    }

    /// `x` `[B, L, D]`; `rope` the tables for these positions; `mask`
    /// additive `[B, 1, L, S]`; `cache` the keys and values of earlier
    /// positions (`[B, h, S - L, d]`), extended in place.
    fn forward(
        &self,
        x: &Tensor,
        rope_tables: Option<(&Tensor, &Tensor)>,
        mask: Option<&Tensor>,
        cache: Option<&mut (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, l, dim) = x.dims3()?;
        let d = dim / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((b, l, 3, self.heads, d))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous();
        let (mut q, mut k, v) = (part(0)?, part(1)?, part(2)?);
        if let Some((cos, sin)) = rope_tables {
            q = rope(&q, cos, sin)?;
            k = rope(&k, cos, sin)?;
        }
        let (k, v) = match cache {
            Some(c) => {
                let k = Tensor::cat(&[&c.0, &k], 2)?;
                let v = Tensor::cat(&[&c.1, &v], 2)?;
                // Decoding never differentiates: a cache that kept its
                // graph would hold every earlier step's keys and values
                // (memory quadratic in the length; a GPU ran out of it).
                *c = (k.detach(), v.detach());
                (k, v)
            }
            None => (k, v),
        };
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let y = softmax_last_dim(&scores)?.matmul(&v)?;
        self.out.forward(&y.transpose(1, 2)?.reshape((b, l, dim))?)
    }
}

/// SwiGLU MLP (LM) or GELU MLP (ViT).
#[derive(Debug, Clone)]
struct Mlp {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, gated: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate: gated
                .then(|| linear_no_bias(dim, hidden, vb.pp("gate")))
                .transpose()?,
            up: linear_no_bias(dim, hidden, vb.pp("up"))?,
            down: linear_no_bias(hidden, dim, vb.pp("down"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate {
            Some(g) => (g.forward(x)?.silu()? * self.up.forward(x)?)?,
            None => self.up.forward(x)?.gelu()?,
        };
        self.down.forward(&h)
    }
}

/// A pre-norm transformer block.
#[derive(Debug, Clone)]
struct Block {
    norm1: RmsNorm,
    attn: Attention,
    norm2: RmsNorm,
    mlp: Mlp,
}

impl Block {
    fn new(dim: usize, heads: usize, mlp_ratio: usize, gated: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: norm(dim, vb.pp("norm1"))?,
            attn: Attention::new(dim, heads, vb.pp("attn"))?,
            norm2: norm(dim, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, mlp_ratio * dim, gated, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        mask: Option<&Tensor>,
        cache: Option<&mut (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, rope, mask, cache)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }
}

fn norm(dim: usize, vb: VarBuilder) -> Result<RmsNorm> {
    Ok(RmsNorm::new(
        vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
        1e-6,
    ))
}

/// The value-smooth part of the number tokens' rows (see [`NumberTokens`]).
#[derive(Debug, Clone)]
struct NumberRows {
    first: usize,
    /// `C`, `[count, basis]`, fixed.
    cosines: Tensor,
    /// `A` of the LM head, `[basis, H]`.
    head: Tensor,
    /// `A` of the embedding, `[basis, H]`.
    embed: Tensor,
}

impl NumberRows {
    fn new(n: &NumberTokens, vocab_size: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        if n.count == 0 || n.basis == 0 || n.first + n.count > vocab_size {
            candle_core::bail!("model config: number tokens {n:?} do not fit a vocabulary of {vocab_size}");
        }
        let cosines: Vec<f32> = (0..n.count)
            .flat_map(|v| {
                (0..n.basis).map(move |k| {
                    (std::f64::consts::PI * k as f64 * (v as f64 + 0.5) / n.count as f64).cos() as f32
                })
            })
            .collect();
        // Rows of C @ A start with the scale of a free row (1 / sqrt(H)).
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0 / ((dim * n.basis) as f64).sqrt(),
        };
        Ok(Self {
            first: n.first,
            cosines: Tensor::from_vec(cosines, (n.count, n.basis), vb.device())?,
            head: vb.get_with_hints((n.basis, dim), "head", init)?,
            embed: vb.get_with_hints((n.basis, dim), "embed", init)?,
        })
    }

    /// `free` `[V, H]` plus `C @ part` on the number rows.
    fn add_to(&self, free: &Tensor, part: &Tensor) -> Result<Tensor> {
        let (v, h) = free.dims2()?;
        let smooth = self.cosines.matmul(part)?;
        let count = smooth.dim(0)?;
        let dev = free.device();
        let padded = Tensor::cat(
            &[
                &Tensor::zeros((self.first, h), DType::F32, dev)?,
                &smooth,
                &Tensor::zeros((v - self.first - count, h), DType::F32, dev)?,
            ],
            0,
        )?;
        free + padded
    }
}

/// Fixed 2D sine-cosine positions `[g * g, dim]` of a `g x g` patch grid
/// (half the channels encode the row, half the column), so the ViT knows
/// where a patch is from the first step; a learned table is added on top.
fn grid_positions(g: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let quarter = (dim / 4).max(1);
    let mut table = vec![0f32; g * g * dim];
    for (i, row) in table.chunks_mut(dim).enumerate() {
        for (axis, coord) in [(0, i / g), (1, i % g)] {
            for f in 0..quarter {
                let angle = coord as f64 / 100f64.powf(f as f64 / quarter as f64);
                let base = axis * 2 * quarter + 2 * f;
                if base + 1 < dim {
                    row[base] = angle.sin() as f32;
                    row[base + 1] = angle.cos() as f32;
                }
            }
        }
    }
    Tensor::from_vec(table, (g * g, dim), device)
}

/// The stem's features cut into patches: `[B, G*G, P*P*F]` for images
/// `[B, C, S, S]` (`G = S / P`), each patch's features in (row, column,
/// channel) order, where `conv` (stride 1, zero padding keeping the size)
/// is applied as one matmul over each pixel's unfolded `k x k`
/// neighbourhood followed by GELU. The images are inputs, so unfolding and
/// reordering them is not differentiated, and the features come out
/// already in patch order; candle's conv2d would also work out the images'
/// gradient.
fn stem_patches(images: &Tensor, conv: &Conv2d, p: usize) -> Result<Tensor> {
    let (b, c, s, _) = images.dims4()?;
    let (f, _, k, _) = conv.weight().dims4()?;
    let (g, r, n) = (s / p, k / 2, c * k * k);
    let padded = images.pad_with_zeros(2, r, r)?.pad_with_zeros(3, r, r)?;
    let shifted = (0..k * k)
        .map(|i| padded.narrow(2, i / k, s)?.narrow(3, i % k, s))
        .collect::<Result<Vec<_>>>()?;
    // One row per pixel in patch order, its neighbourhood ordered
    // (channel, row, column) as the weight's.
    let columns = Tensor::stack(&shifted, 2)?
        .reshape((b, n, g, p, g, p))?
        .permute((0, 2, 4, 3, 5, 1))?
        .reshape((b * s * s, n))?;
    let mut out = columns.matmul(&conv.weight().reshape((f, n))?.t()?)?;
    if let Some(bias) = conv.bias() {
        out = out.broadcast_add(bias)?;
    }
    out.gelu()?.reshape((b, g * g, p * p * f))
}

/// Keys and values of every LM layer for the positions decoded so far.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

/// The vision-language model.
pub struct Vlm {
    cfg: VlmConfig,
    stem: Option<Conv2d>,
    patch: Linear,
    /// Learned patch positions, added to the fixed `grid` ones.
    patch_pos: Tensor,
    grid: Tensor,
    vit: Vec<Block>,
    vit_norm: RmsNorm,
    proj_in: Linear,
    proj_out: Linear,
    embed: Tensor,
    lm: Vec<Block>,
    lm_norm: RmsNorm,
    lm_head: Tensor,
    numbers: Option<NumberRows>,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Vlm {
    /// A model with fresh (or `vb`-provided) weights.
    pub fn new(cfg: &VlmConfig, vb: VarBuilder) -> Result<Self> {
        if !cfg.image_size.is_multiple_of(cfg.patch_size)
            || !cfg.vit_dim.is_multiple_of(cfg.vit_heads)
            || !cfg.lm_dim.is_multiple_of(cfg.lm_heads)
        {
            candle_core::bail!("model config: patch size must divide the image, heads the widths: {cfg:?}");
        }
        let p = cfg.patch_size;
        let device = vb.device().clone();
        let (cos, sin) = rope_tables(
            cfg.max_positions,
            cfg.lm_dim / cfg.lm_heads,
            cfg.rope_theta,
            &device,
        )?;
        let vit = (0..cfg.vit_layers)
            .map(|i| {
                Block::new(
                    cfg.vit_dim,
                    cfg.vit_heads,
                    cfg.mlp_ratio,
                    false,
                    vb.pp(format!("vit.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        let lm = (0..cfg.lm_layers)
            .map(|i| {
                Block::new(
                    cfg.lm_dim,
                    cfg.lm_heads,
                    cfg.mlp_ratio,
                    true,
                    vb.pp(format!("lm.{i}")),
                )
            })
            .collect::<Result<_>>()?;
        let std = 1.0 / (cfg.lm_dim as f64).sqrt();
        let numbers = cfg
            .numbers
            .as_ref()
            .map(|n| NumberRows::new(n, cfg.vocab_size, cfg.lm_dim, vb.pp("numbers")))
            .transpose()?;
        let grid = grid_positions(cfg.image_size / p, cfg.vit_dim, &device)?;
        let stem = cfg
            .stem
            .map(|s| {
                if s.kernel % 2 == 0 || s.channels == 0 {
                    candle_core::bail!("model config: the stem needs channels and an odd kernel: {s:?}");
                }
                let conv = Conv2dConfig {
                    padding: s.kernel / 2,
                    ..Default::default()
                };
                conv2d(3, s.channels, s.kernel, conv, vb.pp("stem"))
            })
            .transpose()?;
        let pixel_features = cfg.stem.map_or(3, |s| s.channels);
        Ok(Self {
            stem,
            patch: linear_no_bias(pixel_features * p * p, cfg.vit_dim, vb.pp("patch"))?,
            patch_pos: vb.get_with_hints(
                (cfg.image_tokens(), cfg.vit_dim),
                "patch_pos",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            grid,
            vit,
            vit_norm: norm(cfg.vit_dim, vb.pp("vit_norm"))?,
            proj_in: linear_no_bias(cfg.vit_dim, cfg.lm_dim, vb.pp("proj.0"))?,
            proj_out: linear_no_bias(cfg.lm_dim, cfg.lm_dim, vb.pp("proj.1"))?,
            embed: vb.get_with_hints(
                (cfg.vocab_size, cfg.lm_dim),
                "embed.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            lm,
            lm_norm: norm(cfg.lm_dim, vb.pp("lm_norm"))?,
            lm_head: vb.get_with_hints(
                (cfg.vocab_size, cfg.lm_dim),
                "lm_head.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?,
            numbers,
            cos,
            sin,
            cfg: cfg.clone(),
            device,
        })
    }

    pub fn config(&self) -> &VlmConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The LM head, `[V, H]` (free rows plus the number tokens' smooth part).
    pub fn lm_head_weight(&self) -> Result<Tensor> {
        match &self.numbers {
            Some(n) => n.add_to(&self.lm_head, &n.head),
            None => Ok(self.lm_head.clone()),
        }
    }

    /// Embeddings `[B, T, H]` of tokens `[B, T]`.
    fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let table = match &self.numbers {
            Some(n) => n.add_to(&self.embed, &n.embed)?,
            None => self.embed.clone(),
        };
        let (b, t) = tokens.dims2()?;
        table
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.lm_dim))
    }

    /// Image tokens `[B, N, H]` of images `[B, 3, S, S]` in `[0, 1]`.
    pub fn image_tokens(&self, images: &Tensor) -> Result<Tensor> {
        let (b, c, s, _) = images.dims4()?;
        let p = self.cfg.patch_size;
        let g = s / p;
        if c != 3 || s != self.cfg.image_size {
            candle_core::bail!(
                "images must be [B, 3, {s0}, {s0}], got {:?}",
                images.dims(),
                s0 = self.cfg.image_size
            );
        }
        let x = ((images - 0.5)? * 2.0)?;
        let x = match &self.stem {
            Some(stem) => stem_patches(&x, stem, p)?,
            None => x
                .reshape((b, 3, g, p, g, p))?
                .permute((0, 2, 4, 1, 3, 5))?
                .reshape((b, g * g, 3 * p * p))?,
        };
        let positions = (&self.patch_pos + &self.grid)?;
        let mut x = self.patch.forward(&x)?.broadcast_add(&positions)?;
        for block in &self.vit {
            x = block.forward(&x, None, None, None)?;
        }
        let x = self.vit_norm.forward(&x)?;
        self.proj_out.forward(&self.proj_in.forward(&x)?.gelu()?)
    }

    /// Runs the LM over `[image tokens][embedded text]` from position `start`.
    fn run_lm(
        &self,
        x: Tensor,
        start: usize,
        mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let l = x.dim(1)?;
        if start + l > self.cfg.max_positions {
            candle_core::bail!(
                "sequence of {} positions exceeds max_positions {}",
                start + l,
                self.cfg.max_positions
            );
        }
        let (cos, sin) = (self.cos.narrow(0, start, l)?, self.sin.narrow(0, start, l)?);
        let mut x = x;
        for (i, block) in self.lm.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, Some((&cos, &sin)), mask, layer_cache)?;
        }
        if let Some(c) = cache {
            c.len = start + l;
        }
        self.lm_norm.forward(&x)
    }

    /// Final-norm hidden states `[B, T, H]` of the text positions for
    /// `[image][tokens]`, tokens `[B, T]` u32 right-padded, `mask` `[B, T]`
    /// (nonzero = real token): causal attention, padding keys masked out.
    pub fn hidden_states(&self, images: &Tensor, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let img = self.image_tokens(images)?;
        let (b, n, _) = img.dims3()?;
        let t = tokens.dim(1)?;
        let x = Tensor::cat(&[img, self.embed(tokens)?], 1)?;
        let l = n + t;
        // Additive mask: causal over all positions, and no attention to padding keys.
        let causal = causal_mask(l, &self.device)?;
        let keys = Tensor::cat(
            &[
                Tensor::ones((b, n), DType::F32, &self.device)?,
                mask.to_dtype(DType::F32)?,
            ],
            1,
        )?;
        let pad = ((keys - 1.0)? * 1e9)?.reshape((b, 1, 1, l))?;
        let full = causal.broadcast_add(&pad)?;
        let h = self.run_lm(x, 0, Some(&full), None)?;
        h.narrow(1, n, t)
    }

    /// `hidden_states(...) @ lm_head^T`, `[B, T, V]`: the reference the
    /// tests check the cache against (training uses the fused op instead).
    #[cfg(test)]
    pub fn logits(&self, images: &Tensor, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.hidden_states(images, tokens, mask)?
            .broadcast_matmul(&self.lm_head_weight()?.t()?)
    }

    /// Starts decoding: runs `[image][prompt]` (prompt `[B, P]`, no padding)
    /// and returns the cache and the logits `[B, V]` of the next token.
    pub fn prefill(&self, images: &Tensor, prompt: &Tensor) -> Result<(KvCache, Tensor)> {
        let img = self.image_tokens(images)?;
        let (b, n, _) = img.dims3()?;
        let p = prompt.dim(1)?;
        let x = Tensor::cat(&[img, self.embed(prompt)?], 1)?;
        let l = n + p;
        let causal = causal_mask(l, &self.device)?;
        let (h, d) = (self.cfg.lm_heads, self.cfg.lm_dim / self.cfg.lm_heads);
        let empty = Tensor::zeros((b, h, 0, d), DType::F32, &self.device)?;
        let mut cache = KvCache {
            layers: vec![(empty.clone(), empty); self.cfg.lm_layers],
            len: 0,
        };
        let hidden = self.run_lm(x, 0, Some(&causal), Some(&mut cache))?;
        let last = hidden.narrow(1, l - 1, 1)?.squeeze(1)?.contiguous()?;
        Ok((cache, last.matmul(&self.lm_head_weight()?.t()?)?))
    }

    /// One decoding step: appends `tokens` `[B]` and returns the next logits `[B, V]`.
    pub fn decode_step(&self, cache: &mut KvCache, tokens: &Tensor) -> Result<Tensor> {
        let x = self.embed(&tokens.unsqueeze(1)?)?;
        let start = cache.len;
        let hidden = self.run_lm(x, start, None, Some(cache))?;
        hidden
            .squeeze(1)?
            .contiguous()?
            .matmul(&self.lm_head_weight()?.t()?)
    }
}

/// Additive causal mask `[1, 1, l, l]`: `-1e9` above the diagonal.
fn causal_mask(l: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..l * l)
        .map(|i| if i % l > i / l { -1e9 } else { 0.0 })
        .collect();
    Tensor::from_vec(m, (1, 1, l, l), device)
}

/// Writes the config as JSON.
pub fn save_config(cfg: &VlmConfig, path: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(cfg).map_err(candle_core::Error::wrap)?;
    std::fs::write(path, json).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

/// Reads a config written by [`save_config`].
pub fn load_config(path: &Path) -> Result<VlmConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("model config {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("model config {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SeededVars;
    use crate::util::rng::Rng;
    use candle_core::Shape;
    use candle_nn::VarMap;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    fn small() -> VlmConfig {
        VlmConfig {
            image_size: 16,
            patch_size: 8,
            stem: Some(PixelStem {
                channels: 4,
                kernel: 3,
            }),
            vit_dim: 16,
            vit_layers: 1,
            vit_heads: 2,
            lm_dim: 32,
            lm_layers: 2,
            lm_heads: 4,
            mlp_ratio: 2,
            vocab_size: 23,
            max_positions: 64,
            rope_theta: 10_000.0,
            numbers: Some(NumberTokens {
                first: 5,
                count: 11,
                basis: 4,
            }),
        }
    }

    fn model() -> (VarMap, Vlm) {
        let vars = VarMap::new();
        let m = Vlm::new(&small(), SeededVars::builder(&vars, 0, &Device::Cpu)).unwrap();
        (vars, m)
    }

    /// Every variable's values, by name.
    fn values(vars: &VarMap) -> std::collections::BTreeMap<String, Vec<f32>> {
        let data = vars.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    }

    #[test]
    fn the_seed_fixes_the_initial_weights() {
        let init = |seed| {
            let vars = VarMap::new();
            Vlm::new(&small(), SeededVars::builder(&vars, seed, &Device::Cpu)).unwrap();
            vars
        };
        let vars = init(7);
        let (a, b, c) = (values(&vars), values(&init(7)), values(&init(8)));
        assert_eq!(a, b);
        assert_eq!(a.keys().collect::<Vec<_>>(), c.keys().collect::<Vec<_>>());
        for (name, v) in &a {
            let constant = v.iter().all(|&x| x == v[0]);
            // Random variables differ between seeds; constant ones (norm
            // gains) do not.
            assert_eq!(constant, v == &c[name], "{name}");
            assert!(v.iter().all(|x| x.is_finite()), "{name}");
        }
        // A linear weight `[out, in]` (candle's Kaiming normal: gain sqrt 2
        // over fan-in) has about the variance it should have.
        let (name, w) = a.iter().find(|(k, _)| k.ends_with("qkv.weight")).unwrap();
        let fan_in = vars.data().lock().unwrap()[name].dims()[1];
        let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
        assert!(
            (var * fan_in as f64 / 2.0 - 1.0).abs() < 0.2,
            "{name}: variance {var}"
        );
        // Uniform draws stay in their range and fill it.
        let u = SeededVars::draw(
            &Shape::from((100, 50)),
            Init::Uniform { lo: -0.5, up: 2.0 },
            &mut Rng::new(1),
        );
        assert!(u.iter().all(|&x| (-0.5..2.0).contains(&x)));
        let mean = u.iter().map(|&x| x as f64).sum::<f64>() / u.len() as f64;
        assert!((mean - 0.75).abs() < 0.05, "{mean}");
    }

    fn inputs(b: usize, t: usize) -> (Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let images = Tensor::rand(0f32, 1.0, (b, 3, 16, 16), &dev).unwrap();
        let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 23) as u32).collect();
        let tokens = Tensor::from_vec(tokens, (b, t), &dev).unwrap();
        let mask = Tensor::ones((b, t), DType::U8, &dev).unwrap();
        (images, tokens, mask)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        let (vars, m) = model();
        let (images, tokens, mask) = inputs(2, 5);
        let loss = m
            .logits(&images, &tokens, &mask)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm {norm}");
        }
    }

    #[test]
    fn kv_cache_decoding_equals_the_full_forward() {
        let (_, m) = model();
        let (images, tokens, mask) = inputs(3, 6);
        let full = m.logits(&images, &tokens, &mask).unwrap();
        let (mut cache, mut logits) = m.prefill(&images, &tokens.narrow(1, 0, 1).unwrap()).unwrap();
        for pos in 0..6 {
            let want = full.narrow(1, pos, 1).unwrap().squeeze(1).unwrap();
            assert!(max_diff(&logits, &want) < 1e-4, "position {pos}");
            if pos + 1 < 6 {
                let next = tokens.narrow(1, pos + 1, 1).unwrap().squeeze(1).unwrap();
                logits = m.decode_step(&mut cache, &next).unwrap();
            }
        }
        // The cache keeps no graph: with one, each step's keys would hold
        // every earlier step's alive.
        assert!(cache.layers.iter().all(|(k, v)| !k.track_op() && !v.track_op()));
    }

    #[test]
    fn causal_and_padding_masks_hold() {
        let (_, m) = model();
        let (images, tokens, mask) = inputs(2, 6);
        let base = m.logits(&images, &tokens, &mask).unwrap();
        // A later token changes no earlier position.
        let mut ids: Vec<u32> = tokens.flatten_all().unwrap().to_vec1().unwrap();
        ids[5] = (ids[5] + 1) % 23;
        let changed = Tensor::from_vec(ids, (2, 6), &Device::Cpu).unwrap();
        let after = m.logits(&images, &changed, &mask).unwrap();
        assert!(max_diff(&base.narrow(1, 0, 5).unwrap(), &after.narrow(1, 0, 5).unwrap()) < 1e-6);
        // A padded row equals the same row run short.
        let pad_mask = Tensor::new(&[[1u8, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let padded = m.logits(&images, &tokens, &pad_mask).unwrap();
        let short = m
            .logits(
                &images.narrow(0, 0, 1).unwrap(),
                &tokens.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap(),
                &Tensor::ones((1, 3), DType::U8, &Device::Cpu).unwrap(),
            )
            .unwrap();
        let head = padded.narrow(0, 0, 1).unwrap().narrow(1, 0, 3).unwrap();
        assert!(max_diff(&head, &short) < 1e-5);
    }

    #[test]
    fn configs_and_checkpoints_round_trip() {
        let dir = std::env::temp_dir().join(format!("r1sgg-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (vars, m) = model();
        let path = dir.join("m.safetensors");
        let state = crate::train::checkpoint::TrainingState::default();
        crate::train::checkpoint::save(&path, &vars, None, &state).unwrap();
        save_config(m.config(), &dir.join("model.json")).unwrap();
        assert_eq!(&load_config(&dir.join("model.json")).unwrap(), m.config());
        let (mut vars2, m2) = model();
        crate::train::checkpoint::load(&path, &mut vars2, None).unwrap();
        let (images, tokens, mask) = inputs(1, 4);
        let (a, b) = (
            m.logits(&images, &tokens, &mask).unwrap(),
            m2.logits(&images, &tokens, &mask).unwrap(),
        );
        assert_eq!(max_diff(&a, &b), 0.0);
        std::fs::write(dir.join("bad.json"), b"{").unwrap();
        assert!(load_config(&dir.join("bad.json")).is_err());
        // A config written before the stem existed loads as a model without one.
        let mut old = serde_json::to_value(m.config()).unwrap();
        old.as_object_mut().unwrap().remove("stem");
        std::fs::write(dir.join("old.json"), old.to_string()).unwrap();
        let loaded = load_config(&dir.join("old.json")).unwrap();
        assert_eq!(
            loaded,
            VlmConfig {
                stem: None,
                ..m.config().clone()
            }
        );
        // An even kernel is refused with an error, not a shape panic later.
        let even = VlmConfig {
            stem: Some(PixelStem {
                channels: 4,
                kernel: 2,
            }),
            ..small()
        };
        assert!(Vlm::new(&even, SeededVars::builder(&VarMap::new(), 0, &Device::Cpu)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_stem_is_candles_convolution_cut_into_patches() {
        // Awkward sizes: 3 images, 12x12, 6-pixel patches, 5 features, kernels 1, 3 and 5.
        let (b, s, p, f) = (3, 12, 6, 5);
        let mut rng = Rng::new(7);
        let images: Vec<f32> = (0..b * 3 * s * s).map(|_| rng.range(-1.0, 1.0)).collect();
        let images = Tensor::from_vec(images, (b, 3, s, s), &Device::Cpu).unwrap();
        for k in [1, 3, 5] {
            let vars = VarMap::new();
            let vb = SeededVars::builder(&vars, k as u64, &Device::Cpu);
            let cfg = Conv2dConfig {
                padding: k / 2,
                ..Default::default()
            };
            let conv = conv2d(3, f, k, cfg, vb).unwrap();
            let g = s / p;
            let expected = conv
                .forward(&images)
                .unwrap()
                .gelu()
                .unwrap()
                .reshape((b, f, g, p, g, p))
                .unwrap()
                .permute((0, 2, 4, 3, 5, 1))
                .unwrap()
                .reshape((b, g * g, p * p * f))
                .unwrap();
            let got = stem_patches(&images, &conv, p).unwrap();
            assert_eq!(got.dims(), expected.dims());
            assert!(max_diff(&got, &expected) < 1e-5, "kernel {k}");
        }
    }

    #[test]
    fn a_few_steps_overfit_a_small_batch() {
        let (vars, m) = model();
        let (images, tokens, mask) = inputs(4, 8);
        let mut opt = AdamW::new(
            vars.all_vars(),
            ParamsAdamW {
                lr: 1e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let ce = |m: &Vlm| {
            let logits = m.logits(&images, &tokens, &mask).unwrap();
            let logits = logits.narrow(1, 0, 7).unwrap().reshape((28, 23)).unwrap();
            let targets = tokens.narrow(1, 1, 7).unwrap().flatten_all().unwrap();
            candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
        };
        let first: f32 = ce(&m).to_scalar().unwrap();
        for _ in 0..40 {
            opt.backward_step(&ce(&m)).unwrap();
        }
        let last: f32 = ce(&m).to_scalar().unwrap();
        assert!(last < 0.3 * first, "cross-entropy {first} -> {last}");
    }
}
