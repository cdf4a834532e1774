//! The Qwen2 decoder of Qwen2-VL (`Qwen2VLTextModel`, transformers
//! `modeling_qwen2_vl.py` 5.25.0): token embedding, pre-norm layers of
//! grouped-query attention with M-RoPE and a SwiGLU MLP, final RMSNorm.
//!
//! Per layer, with `x` `[B, T, H]`:
//! `h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))`,
//! `n1 = rmsnorm(x)`, then `y = h + down(silu(gate(n2)) * up(n2))`,
//! `n2 = rmsnorm(h)`. RMSNorm runs in f32 and casts back before its scale
//! (`Qwen2VLRMSNorm`); q/k/v have biases, o_proj none; attention scores are
//! `q k^T / sqrt(head_dim)` plus the causal and padding mask, softmaxed in
//! f32 (transformers' eager attention). Every op has a backward (norm, rope
//! and softmax from `grpo_kernels::candle::nn`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};
use grpo_kernels::candle::nn::{rope, softmax_last_dim, RmsNorm};

use super::checkpoint::{checkpoint, CheckpointGrads};
use super::config::TextConfig;
use super::{linear, norm_weight};

/// Added to the attention score of a masked key: transformers' `finfo.min`.
/// Finite, so a fully masked row softmaxes to a uniform row, not NaN.
pub(super) const MASKED: f32 = f32::MIN;

/// One layer's cache slot: `None` until the first tokens run.
pub(super) type LayerKv = Option<LayerCache>;

/// One layer's cached keys and values, detached: buffers
/// `[B, kv_heads, capacity, head_dim]` whose first `len` positions hold the
/// tokens so far. Appending writes the new positions in place, so a decoding
/// step costs its own tokens, not a copy of the whole cache as a
/// concatenation would; only a full buffer is reallocated, to at least twice
/// its capacity (amortized O(1) per token), and
/// [`LayerCache::reserve`] sizes it once for a known length.
#[derive(Debug)]
pub(super) struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Positions the buffers hold without reallocating.
    fn capacity(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// Keys and values of the cached positions `[B, kv_heads, len, head_dim]`
    /// (views into the buffers: strided, no copy).
    fn live(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }

    /// Reallocates the buffers to hold `capacity` positions (at least `len`).
    pub(super) fn reserve(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity() {
            return Ok(());
        }
        let (k, v) = self.live()?;
        let (b, h, _, d) = k.dims4()?;
        let extra = Tensor::zeros((b, h, capacity - self.len, d), k.dtype(), k.device())?;
        self.k = Tensor::cat(&[&k, &extra], 2)?;
        self.v = Tensor::cat(&[&v, &extra], 2)?;
        Ok(())
    }

    /// Appends `k`, `v` `[B, kv_heads, t, head_dim]` to `slot` and returns
    /// every cached position's keys and values.
    fn append(slot: &mut LayerKv, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.detach().contiguous()?, v.detach().contiguous()?);
        let t = k.dim(2)?;
        let cache = match slot {
            None => slot.insert(LayerCache {
                // Copies, not the computation's own storage: `slice_set` later
                // writes into these buffers.
                k: k.copy()?,
                v: v.copy()?,
                len: t,
            }),
            Some(cache) => {
                if cache.len + t > cache.capacity() {
                    cache.reserve((cache.len + t).max(2 * cache.capacity()))?;
                }
                cache.k.slice_set(&k, 2, cache.len)?;
                cache.v.slice_set(&v, 2, cache.len)?;
                cache.len += t;
                cache
            }
        };
        cache.live()
    }

    /// The cache of rows `index` (`[n]` U32, rows may repeat), capacity kept.
    pub(super) fn select_rows(&self, index: &Tensor) -> Result<Self> {
        Ok(Self {
            k: self.k.index_select(index, 0)?,
            v: self.v.index_select(index, 0)?,
            len: self.len,
        })
    }

    /// A copy with its own buffers (a plain clone would share them, and
    /// appending to one would write into the other).
    pub(super) fn deep_copy(&self) -> Result<Self> {
        Ok(Self {
            k: self.k.copy()?,
            v: self.v.copy()?,
            len: self.len,
        })
    }
}

/// M-RoPE (`Qwen2VLRotaryEmbedding`): angles `p_axis(i) * inv_freq[i]` with
/// `inv_freq[i] = theta^(-2i / head_dim)` (computed in f32 as transformers
/// does), frequency `i` reading the position of axis `c % 3` when it falls
/// in the `c`-th chunk of `mrope_section` (t, h, w, t, ...).
#[derive(Debug, Clone)]
struct MRope {
    /// `[head_dim / 2]`, F32.
    inv_freq: Tensor,
    section: Vec<usize>,
}

impl MRope {
    fn new(cfg: &TextConfig, device: &candle_core::Device) -> Result<Self> {
        let dim = cfg.head_dim();
        let theta = cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        Ok(Self {
            inv_freq: Tensor::new(inv, device)?,
            section: cfg.mrope_section.clone(),
        })
    }

    /// `cos` and `sin` `[B, 1, T, head_dim / 2]` (F32) for positions `[3, B, T]`.
    fn tables(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.dim(0)?;
        let freqs = positions
            .to_dtype(DType::F32)?
            .unsqueeze(3)?
            .broadcast_mul(&self.inv_freq.reshape((1, 1, 1, half))?)?;
        let mut parts = Vec::with_capacity(self.section.len());
        let mut start = 0;
        for (chunk, &len) in self.section.iter().enumerate() {
            parts.push(freqs.get(chunk % 3)?.narrow(2, start, len)?);
            start += len;
        }
        let angles = Tensor::cat(&parts, 2)?.unsqueeze(1)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// The additive attention mask `[B, 1, T, S]` (F32: 0 or [`MASKED`]) of
/// `T` queries that follow `S - T` earlier keys: query `i` sees key `j` iff
/// `j <= S - T + i` and `pad[b, j]` is 0. `pad` is `[B, S]`, additive.
pub(super) fn attention_mask(pad: &Tensor, t: usize) -> Result<Tensor> {
    let (_, s) = pad.dims2()?;
    let dev = pad.device();
    let queries = Tensor::arange((s - t) as u32, s as u32, dev)?.reshape((t, 1))?;
    let keys = Tensor::arange(0u32, s as u32, dev)?.reshape((1, s))?;
    let causal = (keys.broadcast_gt(&queries)?.to_dtype(DType::F32)? * f64::from(MASKED))?;
    // A key both in the future and padding would sum to -inf: clamp to MASKED.
    causal
        .unsqueeze(0)?
        .broadcast_add(&pad.unsqueeze(1)?)?
        .maximum(MASKED)?
        .unsqueeze(1)
}

/// Grouped-query self-attention with q/k/v biases (`Qwen2VLAttention`).
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: linear(h, heads * d, true, vb.pp("q_proj"))?,
            k_proj: linear(h, kv_heads * d, true, vb.pp("k_proj"))?,
            v_proj: linear(h, kv_heads * d, true, vb.pp("v_proj"))?,
            o_proj: linear(heads * d, h, false, vb.pp("o_proj"))?,
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    /// `x` `[B, T, H]`; `cos`/`sin` `[B, 1, T, head_dim / 2]`; `mask`
    /// `[B, 1, T, S]`; with `cache`, the keys and values of the `S - T`
    /// earlier tokens, extended by these (detached: decoding only).
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let d = self.head_dim;
        let split = |proj: &Linear, n: usize| proj.forward(x)?.reshape((b, t, n, d))?.transpose(1, 2);
        let q = rope(&split(&self.q_proj, self.heads)?, cos, sin)?;
        let k = rope(&split(&self.k_proj, self.kv_heads)?, cos, sin)?;
        let v = split(&self.v_proj, self.kv_heads)?.contiguous()?;
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => LayerCache::append(slot, &k, &v)?,
        };
        let s = k.dim(2)?;
        // Query head h reads K/V head h / rep (transformers' repeat_kv):
        // folding each group's heads into rows shares K and V without copies.
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, rep * t, d))?;
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .reshape((b, self.heads, t, s))?;
        let scores = (scores * (d as f64).powf(-0.5))?.broadcast_add(mask)?;
        let probs =
            softmax_last_dim(&scores)?
                .to_dtype(x.dtype())?
                .reshape((b, self.kv_heads, rep * t, s))?;
        let y = probs
            .matmul(&v)?
            .reshape((b, self.heads, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, self.heads * d))?;
        self.o_proj.forward(&y)
    }
}

/// `down(silu(gate(x)) * up(x))`, no biases (`Qwen2MLP`).
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(h, i, false, vb.pp("gate_proj"))?,
            up_proj: linear(h, i, false, vb.pp("up_proj"))?,
            down_proj: linear(i, h, false, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = (self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

/// One pre-norm decoder layer (`Qwen2VLDecoderLayer`).
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            input_layernorm: RmsNorm::new(norm_weight(h, vb.pp("input_layernorm"))?, cfg.rms_norm_eps),
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: RmsNorm::new(
                norm_weight(h, vb.pp("post_attention_layernorm"))?,
                cfg.rms_norm_eps,
            ),
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let n1 = self.input_layernorm.forward(x)?;
        let h = (x + self.self_attn.forward(&n1, cos, sin, mask, cache)?)?;
        let n2 = self.post_attention_layernorm.forward(&h)?;
        &h + self.mlp.forward(&n2)?
    }

    /// Every weight the layer reads, for [`checkpoint`].
    fn params(&self) -> Vec<Tensor> {
        let a = &self.self_attn;
        let mut p = vec![
            self.input_layernorm.weight.clone(),
            self.post_attention_layernorm.weight.clone(),
        ];
        for lin in [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &self.mlp.gate_proj,
            &self.mlp.up_proj,
            &self.mlp.down_proj,
        ] {
            p.push(lin.weight().clone());
            p.extend(lin.bias().cloned());
        }
        p
    }
}

/// The decoder (`model.*` in Hub checkpoints).
#[derive(Debug, Clone)]
pub(super) struct TextModel {
    /// `[vocab, H]`; also the LM head when the embeddings are tied.
    pub(super) embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: MRope,
}

impl TextModel {
    /// Weights under `vb` with the Hub names (`embed_tokens`, `layers.N.*`, `norm`).
    pub(super) fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: super::INIT_STD,
        };
        Ok(Self {
            embed_tokens: vb.get_with_hints(
                (cfg.vocab_size, cfg.hidden_size),
                "embed_tokens.weight",
                init,
            )?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| DecoderLayer::new(cfg, vb.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            norm: RmsNorm::new(norm_weight(cfg.hidden_size, vb.pp("norm"))?, cfg.rms_norm_eps),
            rope: MRope::new(cfg, vb.device())?,
        })
    }

    /// Rows of `embed_tokens` for `ids` `[B, T]` (U32) as `[B, T, H]`.
    pub(super) fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.embed_tokens.dim(1)?))
    }

    /// Hidden states after the final norm `[B, T, H]` of `embeds` `[B, T, H]`
    /// at `positions` `[3, B, T]`; `pad` `[B, S]` is the additive padding
    /// mask over all `S` keys (the cached ones first). With `caches` (one
    /// per layer) the layers read and extend them; else, with `store`, each
    /// layer is checkpointed into it.
    pub(super) fn forward(
        &self,
        embeds: &Tensor,
        positions: &Tensor,
        pad: &Tensor,
        caches: Option<&mut [LayerKv]>,
        store: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let (cos, sin) = self.rope.tables(positions)?;
        let mask = attention_mask(pad, embeds.dim(1)?)?;
        let mut h = embeds.clone();
        match caches {
            Some(caches) => {
                for (layer, slot) in self.layers.iter().zip(caches) {
                    h = layer.forward(&h, &cos, &sin, &mask, Some(slot))?;
                }
            }
            None => {
                for layer in &self.layers {
                    h = match store {
                        None => layer.forward(&h, &cos, &sin, &mask, None)?,
                        Some(store) => {
                            let (l, c, s, m) = (layer.clone(), cos.clone(), sin.clone(), mask.clone());
                            checkpoint(&h, layer.params(), store, move |x| l.forward(x, &c, &s, &m, None))?
                        }
                    };
                }
            }
        }
        self.norm.forward(&h)
    }

    /// Number of decoder layers.
    pub(super) fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::VarMap;
    use grpo_kernels::candle::nn::rope_tables;

    use super::super::tests::{assert_close, max_abs_diff, randomize, tiny_config};
    use super::*;

    fn model(dtype: DType) -> (TextModel, VarMap) {
        let cfg = tiny_config(false);
        let vm = VarMap::new();
        let m = TextModel::new(
            &cfg.text,
            VarBuilder::from_varmap(&vm, dtype, &Device::Cpu).pp("model"),
        )
        .unwrap();
        randomize(&vm, 3);
        (m, vm)
    }

    fn text_positions(b: usize, t: usize) -> Tensor {
        Tensor::arange(0i64, t as i64, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, t))
            .unwrap()
            .broadcast_as((3, b, t))
            .unwrap()
            .contiguous()
            .unwrap()
    }

    fn no_pad(b: usize, s: usize) -> Tensor {
        Tensor::zeros((b, s), DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn mask_is_causal_and_hides_padding() {
        // Row 1's keys 0 and 3 are padding; 2 earlier keys precede the 2 queries.
        let pad = Tensor::new(&[[0f32, 0., 0., 0.], [MASKED, 0., 0., MASKED]], &Device::Cpu).unwrap();
        let m = attention_mask(&pad, 2).unwrap();
        assert_eq!(m.dims(), &[2, 1, 2, 4]);
        let allowed: Vec<Vec<Vec<bool>>> = m
            .squeeze(1)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|q| q.into_iter().map(|v| v == 0.0).collect())
                    .collect()
            })
            .collect();
        assert_eq!(
            allowed[0],
            vec![vec![true, true, true, false], vec![true, true, true, true]]
        );
        assert_eq!(
            allowed[1],
            vec![vec![false, true, true, false], vec![false, true, true, false]]
        );
        // Padding in the future stays finite (no -inf).
        assert!(m
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite()));
    }

    #[test]
    fn mrope_of_text_positions_is_plain_rope() {
        let cfg = tiny_config(false).text;
        let r = MRope::new(&cfg, &Device::Cpu).unwrap();
        let (cos, sin) = r.tables(&text_positions(2, 7)).unwrap();
        let (c0, s0) = rope_tables(7, cfg.head_dim(), cfg.rope_theta, &Device::Cpu).unwrap();
        for b in 0..2 {
            let row = |t: &Tensor| t.get(b).unwrap().squeeze(0).unwrap();
            assert!(max_abs_diff(&row(&cos), &c0) < 1e-6);
            assert!(max_abs_diff(&row(&sin), &s0) < 1e-6);
        }
    }

    #[test]
    fn mrope_reads_each_section_from_its_axis() {
        // mrope_section [2, 3, 3]: frequencies 0-1 follow t, 2-4 h, 5-7 w.
        let cfg = tiny_config(false).text;
        assert_eq!(cfg.mrope_section, vec![2, 3, 3]);
        let r = MRope::new(&cfg, &Device::Cpu).unwrap();
        let pos = Tensor::new(&[[[5i64]], [[11]], [[17]]], &Device::Cpu).unwrap();
        let (cos, _) = r.tables(&pos).unwrap();
        let cos = cos.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let inv = r.inv_freq.to_vec1::<f32>().unwrap();
        for (i, c) in cos.iter().enumerate() {
            let p = [5.0, 5.0, 11.0, 11.0, 11.0, 17.0, 17.0, 17.0][i];
            assert!((c - (p * inv[i]).cos()).abs() < 1e-6, "frequency {i}");
        }
    }

    /// The layers run one token at a time through the cache equal one full pass.
    #[test]
    fn cached_decoding_equals_the_full_forward() {
        let (m, _vm) = model(DType::F32);
        let ids = Tensor::new(&[[1u32, 5, 9, 2, 7, 3], [4, 4, 8, 1, 0, 6]], &Device::Cpu).unwrap();
        let (b, t) = ids.dims2().unwrap();
        let full = m
            .forward(
                &m.embed(&ids).unwrap(),
                &text_positions(b, t),
                &no_pad(b, t),
                None,
                None,
            )
            .unwrap();
        let mut caches: Vec<LayerKv> = (0..m.num_layers()).map(|_| None).collect();
        let prefix = 4;
        let head = ids.narrow(1, 0, prefix).unwrap();
        let mut outs = vec![m
            .forward(
                &m.embed(&head).unwrap(),
                &text_positions(b, prefix),
                &no_pad(b, prefix),
                Some(&mut caches),
                None,
            )
            .unwrap()];
        for i in prefix..t {
            let tok = ids.narrow(1, i, 1).unwrap();
            let pos = (text_positions(b, 1) + i as f64).unwrap();
            outs.push(
                m.forward(
                    &m.embed(&tok).unwrap(),
                    &pos,
                    &no_pad(b, i + 1),
                    Some(&mut caches),
                    None,
                )
                .unwrap(),
            );
        }
        assert_close(&Tensor::cat(&outs, 1).unwrap(), &full, 1e-5, "cached vs full");
        let cache = caches[0].as_ref().unwrap();
        // The prefill's buffer held 4 positions; the first step doubled it and
        // the second wrote in place.
        assert_eq!((cache.len, cache.capacity()), (t, 2 * prefix));
        let (k, _) = cache.live().unwrap();
        assert_eq!(k.dims(), &[b, 2, t, 16]);
        assert!(!k.track_op(), "the cache keeps no graph");
    }

    /// GQA by folding query groups equals attention over K/V heads repeated
    /// with `repeat_kv`, written out plainly.
    #[test]
    fn grouped_attention_equals_repeated_kv_heads() {
        let (m, _vm) = model(DType::F32);
        let a = &m.layers[0].self_attn;
        let dev = Device::Cpu;
        let (b, t, d) = (2, 5, a.head_dim);
        let x = Tensor::randn(0f32, 1., (b, t, 64), &dev).unwrap();
        let (cos, sin) = m.rope.tables(&text_positions(b, t)).unwrap();
        let mask = attention_mask(&no_pad(b, t), t).unwrap();
        let got = a.forward(&x, &cos, &sin, &mask, None).unwrap();

        let split = |p: &Linear, n: usize| {
            p.forward(&x)
                .unwrap()
                .reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q = rope(&split(&a.q_proj, a.heads), &cos, &sin).unwrap();
        let k = rope(&split(&a.k_proj, a.kv_heads), &cos, &sin).unwrap();
        let v = split(&a.v_proj, a.kv_heads);
        let rep = a.heads / a.kv_heads;
        let heads: Vec<Tensor> = (0..a.heads)
            .map(|h| {
                let (qh, kh, vh) = (
                    q.narrow(1, h, 1).unwrap(),
                    k.narrow(1, h / rep, 1).unwrap(),
                    v.narrow(1, h / rep, 1).unwrap(),
                );
                let s = (qh.matmul(&kh.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
                let s = s.broadcast_add(&mask).unwrap();
                candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&vh).unwrap()
            })
            .collect();
        let y = Tensor::cat(&heads, 1)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, a.heads * d))
            .unwrap();
        assert_close(&got, &a.o_proj.forward(&y).unwrap(), 1e-5, "attention");
    }

    /// Checkpointed layers give the same output and the same gradients, for
    /// the input and for every weight, as plain ones.
    #[test]
    fn checkpointed_layers_equal_plain_ones() {
        let (m, vm) = model(DType::F32);
        let dev = Device::Cpu;
        let (b, t) = (2, 6);
        let x = Var::randn(0f32, 1., (b, t, 64), &dev).unwrap();
        let pad = Tensor::new(&[[0f32; 6], [0., 0., 0., 0., MASKED, MASKED]], &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (b, t, 64), &dev).unwrap();
        let run = |store: Option<&CheckpointGrads>| {
            let y = m
                .forward(x.as_tensor(), &text_positions(b, t), &pad, None, store)
                .unwrap();
            let mut g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            if let Some(s) = store {
                assert!(s.pending() > 0);
                s.merge_into(&mut g).unwrap();
                assert_eq!(s.pending(), 0);
            }
            (y, g)
        };
        let (y0, g0) = run(None);
        let store = CheckpointGrads::default();
        let (y1, g1) = run(Some(&store));
        assert_close(&y1, &y0, 0.0, "output");
        assert_close(
            g1.get(x.as_tensor()).unwrap(),
            g0.get(x.as_tensor()).unwrap(),
            1e-6,
            "dx",
        );
        let vars = vm.data().lock().unwrap();
        for (name, v) in vars
            .iter()
            .filter(|(n, _)| n.starts_with("model.layers") || n.starts_with("model.norm"))
        {
            let (a, e) = (g1.get(v.as_tensor()), g0.get(v.as_tensor()));
            let (a, e) = (a.unwrap_or_else(|| panic!("{name}: no gradient")), e.unwrap());
            assert_close(a, e, 1e-6, name);
        }
    }
}
