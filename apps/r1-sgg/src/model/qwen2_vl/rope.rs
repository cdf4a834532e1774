//! M-RoPE position ids: transformers' `Qwen2VLModel.get_rope_index`
//! (`modeling_qwen2_vl.py`, 5.25.0), on the host.
//!
//! Each token gets three positions (temporal, height, width). Text tokens
//! count up on all three axes alike. A run of `<|image_pad|>` tokens is one
//! image whose merged grid is `t x h' x w'` (`h' = h / merge`,
//! `w' = w / merge`); starting at the running position `s`, its token
//! `(i, r, c)` (row-major) gets `(s + i, s + r, s + c)`, and the text after
//! it resumes at `s + max(h', w')`. With an attention mask only the real
//! tokens are numbered (padding gets 0 on every axis). The rope delta of a
//! row is `max position + 1 - real tokens`: decoding continues the row at
//! `tokens so far + delta` (the same on all three axes).
//!
//! transformers 5.x marks image tokens with the processor's
//! `mm_token_type_ids`, which are 1 exactly where `input_ids` is the image
//! token; here they are found by id. A run is grouped as 5.x groups it:
//! consecutive image tokens form one image, so two images must be separated
//! by other tokens (Qwen2-VL's template puts `<|vision_end|>` and
//! `<|vision_start|>` between them).

use candle_core::{Device, Tensor};

use super::config::Config;

/// Position ids `[3, batch, seq]` and per-row rope deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    /// Rows of the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// `[3, batch, seq]` row-major: axis (t, h, w), then row, then token.
    pub positions: Vec<i64>,
    /// Per row: `max position + 1 - real tokens`.
    pub deltas: Vec<i64>,
}

impl RopeIndex {
    /// The positions as an I64 tensor `[3, batch, seq]`.
    pub fn to_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&self.positions, (3, self.batch, self.seq), device)
    }
}

/// Why position ids could not be computed; each variant names the row and token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RopeError {
    /// The rows of `input_ids` (or of the mask) differ in length.
    #[error("{what} row {row} has {len} tokens, expected {expected}")]
    Ragged {
        /// `input_ids` or `attention_mask`.
        what: &'static str,
        /// The row.
        row: usize,
        /// Its length.
        len: usize,
        /// The first row's length (or the ids' for the mask).
        expected: usize,
    },
    /// The mask has a different number of rows than the ids.
    #[error("attention_mask has {found} rows, input_ids {expected}")]
    MaskRows {
        /// The mask's rows.
        found: usize,
        /// The ids' rows.
        expected: usize,
    },
    /// A row has no real token (its mask is all zero).
    #[error("row {row} has no unmasked token")]
    EmptyRow {
        /// The row.
        row: usize,
    },
    /// More image blocks in the prompt than grids in `image_grid_thw`.
    #[error("the image at row {row}, token {token} has no grid (image_grid_thw has {grids})")]
    MissingGrid {
        /// The row.
        row: usize,
        /// Index of the block's first token in the row.
        token: usize,
        /// Grids given.
        grids: usize,
    },
    /// Fewer image blocks than grids.
    #[error("image_grid_thw has {grids} grids but the prompt has {images} images")]
    UnusedGrids {
        /// Grids given.
        grids: usize,
        /// Image blocks found.
        images: usize,
    },
    /// An image block's length does not match its grid.
    #[error(
        "the image at row {row}, token {token} has {found} <|image_pad|> tokens, \
         its grid {grid:?} gives {expected}"
    )]
    BlockLength {
        /// The row.
        row: usize,
        /// Index of the block's first token in the row.
        token: usize,
        /// Tokens in the block.
        found: usize,
        /// The grid `[t, h, w]` in patches.
        grid: [usize; 3],
        /// `t * h * w / merge^2`.
        expected: usize,
    },
    /// A grid whose height or width is not a multiple of the merge size, or is empty.
    #[error("grid {index} {grid:?} must be non-empty with h and w multiples of spatial_merge_size {merge}")]
    Grid {
        /// Which grid.
        index: usize,
        /// The grid `[t, h, w]`.
        grid: [usize; 3],
        /// `spatial_merge_size`.
        merge: usize,
    },
    /// Video tokens are not supported.
    #[error("row {row}, token {token} is <|video_pad|>: videos are not supported")]
    Video {
        /// The row.
        row: usize,
        /// The token.
        token: usize,
    },
}

/// Checks `grid` against the merge size and returns its merged `(t, h', w')`.
pub(crate) fn merged_grid(index: usize, grid: [usize; 3], merge: usize) -> Result<[usize; 3], RopeError> {
    let [t, h, w] = grid;
    if t == 0 || h == 0 || w == 0 || h % merge != 0 || w % merge != 0 {
        return Err(RopeError::Grid { index, grid, merge });
    }
    Ok([t, h / merge, w / merge])
}

/// transformers' `get_rope_index` for images (see the module doc):
/// `input_ids` rows of equal length, `attention_mask` (nonzero = real token)
/// of the same shape, one `[t, h, w]` grid (in patches) per image in prompt
/// order across the batch.
pub fn get_rope_index(
    cfg: &Config,
    input_ids: &[Vec<u32>],
    attention_mask: Option<&[Vec<u32>]>,
    image_grid_thw: &[[usize; 3]],
) -> Result<RopeIndex, RopeError> {
    let batch = input_ids.len();
    let seq = input_ids.first().map_or(0, Vec::len);
    for (row, ids) in input_ids.iter().enumerate() {
        if ids.len() != seq {
            return Err(RopeError::Ragged {
                what: "input_ids",
                row,
                len: ids.len(),
                expected: seq,
            });
        }
    }
    if let Some(mask) = attention_mask {
        if mask.len() != batch {
            return Err(RopeError::MaskRows {
                found: mask.len(),
                expected: batch,
            });
        }
        for (row, m) in mask.iter().enumerate() {
            if m.len() != seq {
                return Err(RopeError::Ragged {
                    what: "attention_mask",
                    row,
                    len: m.len(),
                    expected: seq,
                });
            }
        }
    }
    let merge = cfg.vision.spatial_merge_size;
    let mut grids = image_grid_thw.iter().enumerate();
    let mut images = 0;
    let mut positions = vec![0i64; 3 * batch * seq];
    let mut deltas = Vec::with_capacity(batch);
    for (row, ids) in input_ids.iter().enumerate() {
        // Indices of the real tokens, and their positions as they are assigned.
        let real: Vec<usize> = match attention_mask {
            Some(mask) => (0..seq).filter(|&i| mask[row][i] != 0).collect(),
            None => (0..seq).collect(),
        };
        if real.is_empty() {
            return Err(RopeError::EmptyRow { row });
        }
        let mut thw: Vec<[i64; 3]> = Vec::with_capacity(real.len());
        let mut current = 0i64;
        let mut k = 0;
        while k < real.len() {
            let token = real[k];
            let id = ids[token];
            if id == cfg.video_token_id {
                return Err(RopeError::Video { row, token });
            }
            if id != cfg.image_token_id {
                thw.push([current; 3]);
                current += 1;
                k += 1;
                continue;
            }
            let run = real[k..]
                .iter()
                .take_while(|&&i| ids[i] == cfg.image_token_id)
                .count();
            let (index, &grid) = grids.next().ok_or(RopeError::MissingGrid {
                row,
                token,
                grids: image_grid_thw.len(),
            })?;
            images += 1;
            let [t, h, w] = merged_grid(index, grid, merge)?;
            if run != t * h * w {
                return Err(RopeError::BlockLength {
                    row,
                    token,
                    found: run,
                    grid,
                    expected: t * h * w,
                });
            }
            for i in 0..t {
                for r in 0..h {
                    for c in 0..w {
                        thw.push([current + i as i64, current + r as i64, current + c as i64]);
                    }
                }
            }
            current += h.max(w) as i64;
            k += run;
        }
        for (&token, p) in real.iter().zip(&thw) {
            for (axis, &v) in p.iter().enumerate() {
                positions[(axis * batch + row) * seq + token] = v;
            }
        }
        let max = thw.iter().flatten().copied().max().unwrap_or(0);
        deltas.push(max + 1 - real.len() as i64);
    }
    if images != image_grid_thw.len() {
        return Err(RopeError::UnusedGrids {
            grids: image_grid_thw.len(),
            images,
        });
    }
    Ok(RopeIndex {
        batch,
        seq,
        positions,
        deltas,
    })
}

#[cfg(test)]
mod tests {
    use super::super::config::{TextConfig, VisionConfig};
    use super::*;

    const IMG: u32 = 9;
    const VID: u32 = 8;

    fn cfg() -> Config {
        Config {
            text: TextConfig {
                vocab_size: 16,
                hidden_size: 16,
                intermediate_size: 32,
                num_hidden_layers: 1,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                rms_norm_eps: 1e-6,
                rope_theta: 1e4,
                mrope_section: vec![1, 1, 2],
                max_position_embeddings: 64,
            },
            vision: VisionConfig {
                hidden_size: 16,
                ..VisionConfig::default()
            },
            image_token_id: IMG,
            video_token_id: VID,
            vision_start_token_id: 6,
            vision_end_token_id: 7,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: Vec::new(),
            dtype: None,
        }
    }

    /// Positions of one row as `(t, h, w)` triples.
    fn triples(ix: &RopeIndex, row: usize) -> Vec<(i64, i64, i64)> {
        let at = |axis: usize, i: usize| ix.positions[(axis * ix.batch + row) * ix.seq + i];
        (0..ix.seq).map(|i| (at(0, i), at(1, i), at(2, i))).collect()
    }

    #[test]
    fn qwen2vl_md_case_24_text_tokens_then_a_6x8_grid() {
        // QWEN2VL.md §1, checked on transformers 5.25: 24 text tokens, grid
        // 6x8 patches -> 3x4 = 12 tokens at t=24, h=24..26, w=24..27, next text at 28.
        let mut ids = vec![1u32; 24];
        ids.extend([IMG; 12]);
        ids.extend([2, 3, 4]);
        let ix = get_rope_index(&cfg(), &[ids], None, &[[1, 6, 8]]).unwrap();
        let p = triples(&ix, 0);
        for (i, &tok) in p[..24].iter().enumerate() {
            assert_eq!(tok, (i as i64, i as i64, i as i64));
        }
        let image: Vec<_> = (0..3)
            .flat_map(|r| (0..4).map(move |c| (24, 24 + r, 24 + c)))
            .collect();
        assert_eq!(&p[24..36], image.as_slice());
        assert_eq!(&p[36..], &[(28, 28, 28), (29, 29, 29), (30, 30, 30)]);
        // 39 tokens, largest position 30: delta 30 + 1 - 39 = -8.
        assert_eq!(ix.deltas, vec![-8]);
        let t = ix.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 1, 39]);
        assert_eq!(t.to_vec3::<i64>().unwrap()[2][0][24..28], [24, 25, 26, 27]);
    }

    #[test]
    fn text_only_rows_count_up_and_have_zero_delta() {
        let ix = get_rope_index(&cfg(), &[vec![1, 2, 3], vec![4, 5, 6]], None, &[]).unwrap();
        assert_eq!(triples(&ix, 1), vec![(0, 0, 0), (1, 1, 1), (2, 2, 2)]);
        assert_eq!(ix.deltas, vec![0, 0]);
    }

    #[test]
    fn masked_tokens_get_zero_and_are_skipped() {
        // Row 0 left-padded, row 1 right-padded; images use grids in batch order.
        let row0 = vec![0, 0, 1, IMG, IMG, 2];
        let row1 = vec![1, IMG, IMG, IMG, IMG, 0];
        let mask = vec![vec![0, 0, 1, 1, 1, 1], vec![1, 1, 1, 1, 1, 0]];
        let ix = get_rope_index(&cfg(), &[row0, row1], Some(&mask), &[[1, 2, 4], [1, 4, 4]]).unwrap();
        // Row 0: grid 2x4 -> 1x2 tokens at (1, 1, 1..2); text resumes at 1 + 2.
        assert_eq!(
            triples(&ix, 0),
            vec![(0, 0, 0), (0, 0, 0), (0, 0, 0), (1, 1, 1), (1, 1, 2), (3, 3, 3)]
        );
        // Row 1: grid 4x4 -> 2x2 tokens; the padding gets 0.
        assert_eq!(
            triples(&ix, 1),
            vec![(0, 0, 0), (1, 1, 1), (1, 1, 2), (1, 2, 1), (1, 2, 2), (0, 0, 0)]
        );
        assert_eq!(ix.deltas, vec![3 + 1 - 4, 2 + 1 - 5]);
    }

    #[test]
    fn temporal_grids_step_the_first_axis() {
        let mut ids = vec![1u32];
        ids.extend([IMG; 8]);
        ids.push(2);
        let p = triples(&get_rope_index(&cfg(), &[ids], None, &[[2, 4, 4]]).unwrap(), 0);
        assert_eq!(
            (p[1], p[4], p[5], p[8]),
            ((1, 1, 1), (1, 2, 2), (2, 1, 1), (2, 2, 2))
        );
        // transformers 5.x resumes at start + max(h', w'), whatever t is.
        assert_eq!(p[9], (3, 3, 3));
    }

    #[test]
    fn errors_name_the_row_and_token() {
        let c = cfg();
        let e = |ids: Vec<Vec<u32>>, mask: Option<Vec<Vec<u32>>>, grids: &[[usize; 3]]| {
            get_rope_index(&c, &ids, mask.as_deref(), grids).unwrap_err()
        };
        assert_eq!(
            e(vec![vec![1, IMG, IMG, IMG, IMG]], None, &[]),
            RopeError::MissingGrid {
                row: 0,
                token: 1,
                grids: 0
            }
        );
        assert_eq!(
            e(vec![vec![1, 2]], None, &[[1, 2, 2]]),
            RopeError::UnusedGrids { grids: 1, images: 0 }
        );
        assert_eq!(
            e(vec![vec![1, IMG, IMG, 2]], None, &[[1, 4, 4]]),
            RopeError::BlockLength {
                row: 0,
                token: 1,
                found: 2,
                grid: [1, 4, 4],
                expected: 4
            }
        );
        assert_eq!(
            e(vec![vec![IMG]], None, &[[1, 3, 2]]),
            RopeError::Grid {
                index: 0,
                grid: [1, 3, 2],
                merge: 2
            }
        );
        assert_eq!(
            e(vec![vec![1, VID]], None, &[]),
            RopeError::Video { row: 0, token: 1 }
        );
        assert_eq!(
            e(vec![vec![1, 2], vec![1]], None, &[]),
            RopeError::Ragged {
                what: "input_ids",
                row: 1,
                len: 1,
                expected: 2
            }
        );
        assert_eq!(
            e(vec![vec![1, 2]], Some(vec![]), &[]),
            RopeError::MaskRows {
                found: 0,
                expected: 1
            }
        );
        assert_eq!(
            e(vec![vec![1, 2]], Some(vec![vec![1]]), &[]),
            RopeError::Ragged {
                what: "attention_mask",
                row: 0,
                len: 1,
                expected: 2
            }
        );
        assert_eq!(
            e(vec![vec![1, 2]], Some(vec![vec![0, 0]]), &[]),
            RopeError::EmptyRow { row: 0 }
        );
    }
}
