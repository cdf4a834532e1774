//! Qwen2-VL's vision tower (`Qwen2VisionTransformerPretrainedModel`,
//! transformers `modeling_qwen2_vl.py` 5.25.0): patch embedding, pre-norm
//! ViT blocks with a 2-D rotary embedding, and the patch merger.
//!
//! - Patch embedding: a Conv3d whose kernel and stride equal its input
//!   (`[C, T, P, P]` per patch, already cut by the processor), hence one
//!   matmul of the `[N, C*T*P*P]` patches with the weight viewed as
//!   `[E, C*T*P*P]` (the checkpoint keeps torch's `[E, C, T, P, P]`).
//! - Block: `h = x + proj(attn(rope(q), rope(k), v))` on `norm1(x)`, then
//!   `y = h + fc2(quick_gelu(fc1(norm2(h))))`; LayerNorms with bias, eps
//!   1e-6; `qkv` and `proj` with biases. Attention is non-causal and
//!   block-diagonal: each image (each frame of it) attends only to itself,
//!   computed image by image so no `[patches, patches]` matrix spans two.
//! - Rotary: each patch's (row, column) in the patch grid, listed in
//!   merge-window order (the processor's layout: the `m x m` patches that
//!   merge into one token are consecutive); angles `row * inv_freq` then
//!   `column * inv_freq`, `inv_freq[i] = theta^(-2i / (head_dim / 2))`,
//!   `i < head_dim / 4`; applied in f32 with rotate_half
//!   (`apply_rotary_pos_emb_vision`).
//! - Merger: `ln_q`, then each window of `m^2` patches viewed as one
//!   `[m^2 E]` row, `mlp.2(gelu_erf(mlp.0(row)))` (exact erf GELU: torch's
//!   `nn.GELU()`), giving one `[hidden_size]` token per window.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use grpo_kernels::candle::nn::{quick_gelu, rope, softmax_last_dim, LayerNorm};

use super::checkpoint::{checkpoint, CheckpointGrads};
use super::config::VisionConfig;
use super::{linear, norm_weight};

/// The vision LayerNorms' epsilon (hard-coded in transformers).
const LN_EPS: f64 = 1e-6;

fn layer_norm(dim: usize, vb: VarBuilder) -> Result<LayerNorm> {
    let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
    Ok(LayerNorm::new(norm_weight(dim, vb)?, Some(bias), LN_EPS))
}

/// Rows `[start, start + len)` of the patches that attend to each other:
/// one segment per frame of each grid (`cu_seqlens` in transformers).
fn segments(grids: &[[usize; 3]]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for &[t, h, w] in grids {
        for _ in 0..t {
            out.push((start, h * w));
            start += h * w;
        }
    }
    out
}

/// Each patch's (row, column) in its grid, in merge-window order
/// (transformers' `get_vision_position_ids`).
pub(super) fn patch_positions(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for br in 0..h / merge {
                for bc in 0..w / merge {
                    for r in 0..merge {
                        for c in 0..merge {
                            out.push((br * merge + r, bc * merge + c));
                        }
                    }
                }
            }
        }
    }
    out
}

/// Non-causal attention with `qkv`/`proj` biases (`VisionAttention`).
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    /// `x` `[N, E]`; `cos`/`sin` `[N, head_dim / 2]` F32.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
        let (n, e) = x.dims2()?;
        let d = e / self.heads;
        let qkv = self.qkv.forward(x)?.reshape((n, 3, self.heads, d))?;
        // [heads, N, d]; q and k rotated in f32, then back to the model dtype.
        let part = |i: usize| qkv.narrow(1, i, 1)?.squeeze(1)?.transpose(0, 1);
        let rotate = |t: Tensor| rope(&t.to_dtype(DType::F32)?, cos, sin)?.to_dtype(x.dtype());
        let (q, k, v) = (rotate(part(0)?)?, rotate(part(1)?)?, part(2)?.contiguous()?);
        let scale = (d as f64).powf(-0.5);
        let outs = segments
            .iter()
            .map(|&(start, len)| {
                let (q, k, v) = (
                    q.narrow(1, start, len)?,
                    k.narrow(1, start, len)?,
                    v.narrow(1, start, len)?,
                );
                let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
                softmax_last_dim(&scores)?.to_dtype(x.dtype())?.matmul(&v)
            })
            .collect::<Result<Vec<_>>>()?;
        let y = Tensor::cat(&outs, 1)?.transpose(0, 1)?.reshape((n, e))?;
        self.proj.forward(&y)
    }
}

/// One pre-norm ViT block (`Qwen2VLVisionBlock`).
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (e, hidden) = (cfg.embed_dim, cfg.embed_dim * cfg.mlp_ratio);
        let attn = vb.pp("attn");
        Ok(Self {
            norm1: layer_norm(e, vb.pp("norm1"))?,
            attn: Attention {
                qkv: linear(e, 3 * e, true, attn.pp("qkv"))?,
                proj: linear(e, e, true, attn.pp("proj"))?,
                heads: cfg.num_heads,
            },
            norm2: layer_norm(e, vb.pp("norm2"))?,
            fc1: linear(e, hidden, true, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(hidden, e, true, vb.pp("mlp").pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
        let h = (x + self.attn.forward(&self.norm1.forward(x)?, cos, sin, segments)?)?;
        let m = self
            .fc2
            .forward(&quick_gelu(&self.fc1.forward(&self.norm2.forward(&h)?)?)?)?;
        &h + m
    }

    /// Every weight the block reads, for [`checkpoint`].
    fn params(&self) -> Vec<Tensor> {
        let mut p = Vec::new();
        for n in [&self.norm1, &self.norm2] {
            p.push(n.weight.clone());
            p.extend(n.bias.clone());
        }
        for lin in [&self.attn.qkv, &self.attn.proj, &self.fc1, &self.fc2] {
            p.push(lin.weight().clone());
            p.extend(lin.bias().cloned());
        }
        p
    }
}

/// `PatchMerger`: `m^2` patches -> one LM token.
#[derive(Debug, Clone)]
struct Merger {
    ln_q: LayerNorm,
    fc0: Linear,
    fc2: Linear,
}

impl Merger {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = self.fc0.weight().dim(1)?;
        let rows = self.ln_q.forward(x)?.reshape(((), width))?;
        self.fc2.forward(&self.fc0.forward(&rows)?.gelu_erf()?)
    }
}

/// The vision tower (`visual.*` in Hub checkpoints).
#[derive(Debug, Clone)]
pub(super) struct VisionModel {
    /// `[E, C, T, P, P]` as in the checkpoint.
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger: Merger,
    /// `[head_dim / 4]`: the 2-D rotary frequencies of one axis.
    inv_freq: Vec<f32>,
    merge: usize,
}

impl VisionModel {
    /// Weights under `vb` with the Hub names (`patch_embed.proj.weight`,
    /// `blocks.N.*`, `merger.*`).
    pub(super) fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let (e, p) = (cfg.embed_dim, cfg.patch_size);
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: super::INIT_STD,
        };
        let patch_embed = vb.pp("patch_embed").pp("proj").get_with_hints(
            (e, cfg.in_channels, cfg.temporal_patch_size, p, p),
            "weight",
            init,
        )?;
        let wide = e * cfg.merge_unit();
        let merger = vb.pp("merger");
        // As transformers computes it: in f32, base ** (arange(0, s, 2) / s).
        let spatial = cfg.head_dim() / 2;
        let theta = cfg.rope_theta as f32;
        Ok(Self {
            patch_embed,
            blocks: (0..cfg.depth)
                .map(|i| Block::new(cfg, vb.pp("blocks").pp(i)))
                .collect::<Result<_>>()?,
            merger: Merger {
                ln_q: layer_norm(e, merger.pp("ln_q"))?,
                fc0: linear(wide, wide, true, merger.pp("mlp").pp(0))?,
                fc2: linear(wide, cfg.hidden_size, true, merger.pp("mlp").pp(2))?,
            },
            inv_freq: (0..spatial / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f32 / spatial as f32))
                .collect(),
            merge: cfg.spatial_merge_size,
        })
    }

    /// `cos` and `sin` `[N, head_dim / 2]` (F32) of the patches of `grids`.
    fn rotary(&self, grids: &[[usize; 3]], device: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let pos = patch_positions(grids, self.merge);
        let angles: Vec<f32> = pos
            .iter()
            .flat_map(|&(r, c)| {
                let row = self.inv_freq.iter().map(move |f| r as f32 * f);
                row.chain(self.inv_freq.iter().map(move |f| c as f32 * f))
            })
            .collect();
        let angles = Tensor::from_vec(angles, (pos.len(), 2 * self.inv_freq.len()), device)?;
        Ok((angles.cos()?, angles.sin()?))
    }

    /// Merged image tokens `[sum(t h w) / m^2, hidden_size]` of the patches
    /// `[sum(t h w), C*T*P*P]` of the images `grids` (`[t, h, w]` in patches,
    /// h and w multiples of the merge size: the caller checks). With `store`
    /// each block is checkpointed into it.
    pub(super) fn forward(
        &self,
        pixels: &Tensor,
        grids: &[[usize; 3]],
        store: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let e = self.patch_embed.dim(0)?;
        let w = self.patch_embed.reshape((e, ()))?;
        let mut x = pixels.to_dtype(w.dtype())?.matmul(&w.t()?)?;
        let (cos, sin) = self.rotary(grids, pixels.device())?;
        let segs = segments(grids);
        for block in &self.blocks {
            x = match store {
                None => block.forward(&x, &cos, &sin, &segs)?,
                Some(store) => {
                    let (b, c, s, g) = (block.clone(), cos.clone(), sin.clone(), segs.clone());
                    checkpoint(&x, block.params(), store, move |x| b.forward(x, &c, &s, &g))?
                }
            };
        }
        self.merger.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    use super::super::tests::{assert_close, randomize, tiny_config};
    use super::*;

    fn model() -> (VisionModel, VarMap, VisionConfig) {
        let cfg = tiny_config(false).vision;
        let vm = VarMap::new();
        let m = VisionModel::new(
            &cfg,
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu).pp("visual"),
        )
        .unwrap();
        randomize(&vm, 5);
        (m, vm, cfg)
    }

    fn pixels(n: usize, cfg: &VisionConfig) -> Tensor {
        Tensor::randn(0f32, 1., (n, cfg.patch_dim()), &Device::Cpu).unwrap()
    }

    #[test]
    fn positions_follow_merge_windows() {
        let p = patch_positions(&[[1, 2, 4]], 2);
        assert_eq!(
            p,
            vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
        );
        // A second frame repeats the grid; a second image starts over.
        let p = patch_positions(&[[2, 2, 2], [1, 2, 2]], 2);
        assert_eq!(p.len(), 12);
        assert_eq!(&p[4..8], &p[..4]);
        assert_eq!(&p[8..], &p[..4]);
    }

    /// The matmul form of the patch embedding equals candle's convolution
    /// with torch's Conv3d semantics (kernel = stride = the patch): the time
    /// axis folded into conv2d's input channels.
    #[test]
    fn patch_embedding_equals_the_convolution() {
        let (m, _vm, cfg) = model();
        let n = 3;
        let px = pixels(n, &cfg);
        let (e, c, t, p) = (
            cfg.embed_dim,
            cfg.in_channels,
            cfg.temporal_patch_size,
            cfg.patch_size,
        );
        let got = px
            .matmul(&m.patch_embed.reshape((e, ())).unwrap().t().unwrap())
            .unwrap();
        let conv = px
            .reshape((n, c * t, p, p))
            .unwrap()
            .conv2d(&m.patch_embed.reshape((e, c * t, p, p)).unwrap(), 0, p, 1, 1)
            .unwrap()
            .reshape((n, e))
            .unwrap();
        assert_close(&got, &conv, 1e-4, "patch embed");
    }

    /// Two images in one call give what each gives alone: attention never
    /// crosses images.
    #[test]
    fn images_attend_only_to_themselves() {
        let (m, _vm, cfg) = model();
        let (g1, g2) = ([1, 2, 4], [1, 4, 2]);
        let (a, b) = (pixels(8, &cfg), pixels(8, &cfg));
        let both = m
            .forward(&Tensor::cat(&[&a, &b], 0).unwrap(), &[g1, g2], None)
            .unwrap();
        let alone = Tensor::cat(
            &[
                m.forward(&a, &[g1], None).unwrap(),
                m.forward(&b, &[g2], None).unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(both.dims(), &[4, cfg.hidden_size]);
        assert_close(&both, &alone, 1e-5, "block-diagonal attention");
    }

    /// The merger's GELU is the exact erf form, `0.5 x (1 + erf(x / sqrt 2))`,
    /// written out here with candle's erf, not the tanh approximation.
    #[test]
    fn merger_uses_erf_gelu() {
        let (m, _vm, cfg) = model();
        let x = Tensor::randn(0f32, 1., (8, cfg.embed_dim), &Device::Cpu).unwrap();
        let rows = m.merger.ln_q.forward(&x).unwrap().reshape((2, ())).unwrap();
        let z = m.merger.fc0.forward(&rows).unwrap();
        let erf = (&z * 0.5).unwrap() * ((&z / 2f64.sqrt()).unwrap().erf().unwrap() + 1.0).unwrap();
        let want = m.merger.fc2.forward(&erf.unwrap()).unwrap();
        assert_close(&m.merger.forward(&x).unwrap(), &want, 1e-5, "merger");
        let tanh = m.merger.fc2.forward(&z.gelu().unwrap()).unwrap();
        assert!(
            super::super::tests::max_abs_diff(&want, &tanh) > 1e-5,
            "the test tells the two GELUs apart"
        );
    }

    #[test]
    fn checkpointed_blocks_equal_plain_ones() {
        let (m, vm, cfg) = model();
        let grids = [[1, 2, 4], [1, 2, 2]];
        let px = Var::from_tensor(&pixels(12, &cfg)).unwrap();
        let w = Tensor::randn(0f32, 1., (3, cfg.hidden_size), &Device::Cpu).unwrap();
        let run = |store: Option<&CheckpointGrads>| {
            let y = m.forward(px.as_tensor(), &grids, store).unwrap();
            let mut g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            if let Some(s) = store {
                s.merge_into(&mut g).unwrap();
            }
            (y, g)
        };
        let (y0, g0) = run(None);
        let (y1, g1) = run(Some(&CheckpointGrads::default()));
        assert_close(&y1, &y0, 0.0, "output");
        assert_close(
            g1.get(px.as_tensor()).unwrap(),
            g0.get(px.as_tensor()).unwrap(),
            1e-6,
            "dpixels",
        );
        for (name, v) in vm.data().lock().unwrap().iter() {
            let got = g1
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            assert_close(got, g0.get(v.as_tensor()).unwrap(), 1e-6, name);
        }
    }
}
