//! Qwen2-VL's image processor and processor, following transformers 5.25's
//! `Qwen2VLImageProcessorPil` (`image_processing_pil_qwen2_vl.py`, the same numerics as 4.x's
//! slow `Qwen2VLImageProcessor`) and `Qwen2VLProcessor`.
//!
//! An image goes through: RGB conversion (transparency composited onto white, as transformers'
//! `convert_to_rgb`), [`smart_resize`] to multiples of `patch_size * merge_size` (28) within the
//! pixel budget, Pillow's BICUBIC resize ([`super::resample`]), rescale by `1/255` (in f64, then
//! f32, as `np_rescale`), normalization with the CLIP mean and std (in f32, as `np_normalize`),
//! and the patch flattening (`patchify`, in merge-window order). The processor then replaces
//! each `<|image_pad|>` of the tokenized chat with one pad per merged patch.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage, RgbaImage};
use serde_json::Value;

use super::resample::resize_bicubic;
use super::tokenizer::{Message, Qwen2VlTokenizer, IMAGE_PAD};
use super::{HfError, ImageProcessorFile, ModelFiles, Result};

/// Pillow's `Image.BICUBIC`, the only `resample` value implemented.
const PIL_BICUBIC: u64 = 3;

/// The image processor's settings (`preprocessor_config.json`, or the `"image_processor"` of
/// `processor_config.json`), with `Qwen2VLImageProcessorPil`'s class defaults for absent keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Fewest pixels after resizing: `min_pixels`, else `size.shortest_edge` (default 56*56).
    pub min_pixels: u64,
    /// Most pixels after resizing: `max_pixels`, else `size.longest_edge` (default 28*28*1280).
    pub max_pixels: u64,
    /// Side of a vision patch (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2); a still image is repeated this many times.
    pub temporal_patch_size: usize,
    /// Side of the patch window the merger folds into one token (2).
    pub merge_size: usize,
    /// Per-channel mean subtracted after rescaling (OpenAI CLIP's).
    pub image_mean: [f64; 3],
    /// Per-channel std divided by after subtracting the mean (OpenAI CLIP's).
    pub image_std: [f64; 3],
    /// Factor from bytes to floats (1/255).
    pub rescale_factor: f64,
    /// Resize with [`smart_resize`] (else the image must already have multiple-of-28 sides).
    pub do_resize: bool,
    /// Multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Subtract `image_mean`, divide by `image_std`.
    pub do_normalize: bool,
    /// Convert decoded images to RGB (transparency onto white).
    pub do_convert_rgb: bool,
}

impl Default for ImageProcessorConfig {
    /// `Qwen2VLImageProcessorPil`'s class attributes (transformers 5.25).
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads the settings from their JSON object (`path` names the file in errors). As
    /// `Qwen2VLImageProcessorPil.__init__`, `min_pixels`/`max_pixels` override
    /// `size.shortest_edge`/`size.longest_edge`; `resample` must be 3 (BICUBIC) when given.
    pub fn from_json(json: &Value, path: &Path) -> Result<Self> {
        let d = Self::default();
        let bad = |key: &str, what: &str| HfError::invalid(path, format!("\"{key}\" is not {what}"));
        let uint = |key: &str| -> Result<Option<u64>> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| bad(key, "a non-negative integer")),
            }
        };
        let size_key = |key: &str| -> Result<Option<u64>> {
            match json.get("size").and_then(|s| s.get(key)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| bad(&format!("size.{key}"), "an integer")),
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| bad(key, "a boolean")),
            }
        };
        let float = |key: &str, default: f64| -> Result<f64> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| bad(key, "a number")),
            }
        };
        // A single number applies to every channel, as transformers accepts.
        let per_channel = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            match json.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Array(v)) if v.len() == 3 => {
                    let mut out = [0.0; 3];
                    for (o, x) in out.iter_mut().zip(v) {
                        *o = x.as_f64().ok_or_else(|| bad(key, "a list of 3 numbers"))?;
                    }
                    Ok(out)
                }
                Some(v) => v
                    .as_f64()
                    .map(|x| [x; 3])
                    .ok_or_else(|| bad(key, "a list of 3 numbers")),
            }
        };
        let positive = |key: &str, default: usize| -> Result<usize> {
            match uint(key)? {
                None => Ok(default),
                Some(0) => Err(bad(key, "positive")),
                Some(v) => usize::try_from(v).map_err(|_| bad(key, "a size")),
            }
        };
        if let Some(resample) = uint("resample")? {
            if resample != PIL_BICUBIC {
                return Err(HfError::invalid(
                    path,
                    format!("\"resample\" is {resample}; only 3 (BICUBIC) is implemented"),
                ));
            }
        }
        let config = Self {
            min_pixels: uint("min_pixels")?
                .or(size_key("shortest_edge")?)
                .unwrap_or(d.min_pixels),
            max_pixels: uint("max_pixels")?
                .or(size_key("longest_edge")?)
                .unwrap_or(d.max_pixels),
            patch_size: positive("patch_size", d.patch_size)?,
            temporal_patch_size: positive("temporal_patch_size", d.temporal_patch_size)?,
            merge_size: positive("merge_size", d.merge_size)?,
            image_mean: per_channel("image_mean", d.image_mean)?,
            image_std: per_channel("image_std", d.image_std)?,
            rescale_factor: float("rescale_factor", d.rescale_factor)?,
            do_resize: flag("do_resize", d.do_resize)?,
            do_rescale: flag("do_rescale", d.do_rescale)?,
            do_normalize: flag("do_normalize", d.do_normalize)?,
            do_convert_rgb: flag("do_convert_rgb", d.do_convert_rgb)?,
        };
        if config.min_pixels > config.max_pixels {
            return Err(HfError::invalid(
                path,
                format!(
                    "min_pixels {} exceeds max_pixels {}",
                    config.min_pixels, config.max_pixels
                ),
            ));
        }
        Ok(config)
    }

    /// Reads the settings of a model directory.
    pub fn from_file(file: &ImageProcessorFile) -> Result<Self> {
        Self::from_json(&file.read()?, file.path())
    }

    /// `patch_size * merge_size`: resized sides are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }
}

/// transformers' `smart_resize(height, width, factor, min_pixels, max_pixels)`: the size
/// (height, width) closest to the image's with both sides multiples of `factor` and the area
/// within `[min_pixels, max_pixels]`. Sides are first rounded to the nearest multiple (Python's
/// `round`, ties to even); above `max_pixels` both are scaled by `beta = sqrt(h * w / max)` and
/// floored (to at least `factor`); below `min_pixels` scaled by `sqrt(min / (h * w))` and ceiled.
/// An empty image, or an aspect ratio above 200 (transformers' `ValueError`), is an error.
pub fn smart_resize(
    height: u32,
    width: u32,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(u32, u32)> {
    let bad = |reason: String| HfError::BadImage {
        width,
        height,
        reason,
    };
    if height == 0 || width == 0 {
        return Err(bad("the image is empty".into()));
    }
    let (h, w, f) = (f64::from(height), f64::from(width), factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(bad(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio}"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    let area = f64::from(height) * f64::from(width);
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if h_bar < 1.0 || w_bar < 1.0 || h_bar > f64::from(u32::MAX) || w_bar > f64::from(u32::MAX) {
        return Err(bad(format!("resizes to {w_bar}x{h_bar}")));
    }
    Ok((h_bar as u32, w_bar as u32))
}

/// A decoded image as RGB, as transformers' `convert_to_rgb` makes it from a PIL image: an image
/// with transparency is composited onto opaque white with Pillow's `alpha_composite` integer
/// arithmetic, anything else converted channel-wise (grey replicated). 16-bit images are first
/// reduced to 8 bits by the `image` crate (Pillow's own 16-bit conversions may differ by a level).
pub fn to_rgb(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba: RgbaImage = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb([over_white(r, a), over_white(g, a), over_white(b, a)])
    })
}

/// One channel of Pillow's `ImagingAlphaComposite(white, src)`: with an opaque destination its
/// coefficients are `a * 128` and `(255 - a) * 128` (7 fractional bits), and the sum is divided
/// by 255 with Pillow's rounded shift (`SHIFTFORDIV255`).
fn over_white(c: u8, a: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    let (c, a) = (u32::from(c), u32::from(a));
    let tmp = (c * a + 255 * (255 - a)) << PRECISION_BITS;
    let x = tmp + (0x80 << PRECISION_BITS);
    ((((x >> 8) + x) >> 8) >> PRECISION_BITS) as u8
}

/// Images ready for the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImages {
    /// `[patches, patch_dim]` row-major: every image's patches, in image order.
    pub pixel_values: Vec<f32>,
    /// `channels * temporal_patch_size * patch_size^2` (1176 for Qwen2-VL).
    pub patch_dim: usize,
    /// Per image, `(grid_t, grid_h, grid_w)` in patches (`image_grid_thw`).
    pub grid_thw: Vec<[usize; 3]>,
}

impl ProcessedImages {
    /// Patches over all images.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum()
    }

    /// `pixel_values` as an f32 tensor `[patches, patch_dim]`.
    pub fn pixel_values_tensor(&self, device: &Device) -> Result<Tensor> {
        Tensor::from_slice(&self.pixel_values, (self.num_patches(), self.patch_dim), device)
            .map_err(|e| HfError::candle("pixel_values", e))
    }
}

/// Qwen2-VL's image processor (transformers' `Qwen2VLImageProcessorPil`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlImageProcessor {
    /// Its settings.
    pub config: ImageProcessorConfig,
}

impl Qwen2VlImageProcessor {
    /// The processor with `config`.
    pub fn new(config: ImageProcessorConfig) -> Self {
        Self { config }
    }

    /// Decodes a PNG or JPEG file (format from its content) and converts it to RGB
    /// ([`to_rgb`]) when `do_convert_rgb`; without conversion a non-RGB image is an error, as
    /// it would not have the three channels the normalization expects. EXIF orientation is not
    /// applied (`PIL.Image.open` does not either).
    ///
    /// PNGs decode to Pillow's bytes. JPEGs do not quite: the `image` crate decodes with
    /// zune-jpeg, Pillow with libjpeg-turbo, whose chroma upsampling and IDCT round
    /// differently. Measured on 800x600 and fixture-size images: with 4:2:0 chroma (Pillow's
    /// default) 20-29% of bytes differ, by at most 4 levels, giving `pixel_values` differences
    /// up to 0.058 (mean 0.006); with 4:4:4, 1% of bytes, at most 3 levels, `pixel_values` up
    /// to 0.044 (mean 0.0002).
    pub fn load_image(&self, path: &Path) -> Result<RgbImage> {
        let image = image::ImageReader::open(path)
            .map_err(|e| HfError::io(path, e))?
            .with_guessed_format()
            .map_err(|e| HfError::io(path, e))?
            .decode()
            .map_err(|source| HfError::Image {
                path: path.to_path_buf(),
                source,
            })?;
        match image {
            DynamicImage::ImageRgb8(rgb) => Ok(rgb),
            other if self.config.do_convert_rgb => Ok(to_rgb(&other)),
            other => Err(HfError::invalid(
                path,
                format!(
                    "image is {:?} and the processor's do_convert_rgb is off",
                    other.color()
                ),
            )),
        }
    }

    /// The resized image the vision tower sees (before rescaling): [`smart_resize`]'s size,
    /// reached with Pillow's BICUBIC. Without `do_resize` the image is kept and its sides must
    /// be multiples of `patch_size * merge_size`.
    pub fn resize(&self, image: &RgbImage) -> Result<RgbImage> {
        let c = &self.config;
        let (width, height) = image.dimensions();
        if !c.do_resize {
            let f = c.factor() as u32;
            if width == 0 || height == 0 || width % f != 0 || height % f != 0 {
                return Err(HfError::BadImage {
                    width,
                    height,
                    reason: format!("do_resize is off and the sides are not positive multiples of {f}"),
                });
            }
            return Ok(image.clone());
        }
        let (h, w) = smart_resize(height, width, c.factor(), c.min_pixels, c.max_pixels)?;
        Ok(resize_bicubic(image, w, h))
    }

    /// Resizes, rescales, normalizes and patchifies each image, concatenating the patches.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<ProcessedImages> {
        let c = &self.config;
        let patch_dim = 3 * c.temporal_patch_size * c.patch_size * c.patch_size;
        let mut out = ProcessedImages {
            pixel_values: Vec::new(),
            patch_dim,
            grid_thw: Vec::new(),
        };
        for image in images {
            let resized = self.resize(image)?;
            let chw = self.normalize(&resized);
            let (grid_h, grid_w) = self.patchify(
                &chw,
                resized.height() as usize,
                resized.width() as usize,
                &mut out.pixel_values,
            );
            out.grid_thw.push([1, grid_h, grid_w]);
        }
        Ok(out)
    }

    /// The image as channel-first floats: `(f32)(byte * rescale_factor)` computed in f64 as
    /// `np_rescale`, then `(x - mean) / std` in f32 as `np_normalize`.
    fn normalize(&self, image: &RgbImage) -> Vec<f32> {
        let c = &self.config;
        let plane = image.width() as usize * image.height() as usize;
        let mut chw = vec![0f32; 3 * plane];
        for (i, px) in image.pixels().enumerate() {
            for ch in 0..3 {
                let byte = f64::from(px[ch]);
                let mut v = if c.do_rescale {
                    (byte * c.rescale_factor) as f32
                } else {
                    byte as f32
                };
                if c.do_normalize {
                    v = (v - c.image_mean[ch] as f32) / c.image_std[ch] as f32;
                }
                chw[ch * plane + i] = v;
            }
        }
        chw
    }

    /// `Qwen2VLImageProcessorPil.patchify`: the `[C, H, W]` image viewed as
    /// `(C, gh/m, m, P, gw/m, m, P)`, transposed to `(gh/m, gw/m, m, m, C, P, P)`, with the
    /// frame repeated `temporal_patch_size` times after `C`, flattened to
    /// `[gh * gw, C * T * P * P]` and appended to `out`. So patches are ordered by merge window
    /// (each window's m x m patches contiguous, row-major inside it), and within a patch by
    /// channel, frame, row, column. Returns `(grid_h, grid_w)`.
    fn patchify(&self, chw: &[f32], height: usize, width: usize, out: &mut Vec<f32>) -> (usize, usize) {
        let (p, m, t) = (
            self.config.patch_size,
            self.config.merge_size,
            self.config.temporal_patch_size,
        );
        let (grid_h, grid_w) = (height / p, width / p);
        let plane = height * width;
        out.reserve(grid_h * grid_w * 3 * t * p * p);
        for bh in 0..grid_h / m {
            for bw in 0..grid_w / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (row0, col0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for ch in 0..3 {
                            for _ in 0..t {
                                for ph in 0..p {
                                    let start = ch * plane + (row0 + ph) * width + col0;
                                    out.extend_from_slice(&chw[start..start + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
        (grid_h, grid_w)
    }

    /// Tokens one image takes in the text after expansion: `t * h * w / merge_size^2`.
    pub fn num_image_tokens(&self, grid_thw: [usize; 3]) -> usize {
        grid_thw.iter().product::<usize>() / (self.config.merge_size * self.config.merge_size)
    }
}

/// Replaces the k-th `image_pad` of `ids` by `tokens_per_image[k]` copies, as
/// `Qwen2VLProcessor.__call__` does on the text (`replace_image_token`); the number of pads must
/// equal the number of images.
pub fn expand_image_pads(ids: &[u32], image_pad: u32, tokens_per_image: &[usize]) -> Result<Vec<u32>> {
    let pads = ids.iter().filter(|&&id| id == image_pad).count();
    if pads != tokens_per_image.len() {
        return Err(HfError::ImageCountMismatch {
            token: IMAGE_PAD,
            pads,
            images: tokens_per_image.len(),
        });
    }
    let extra: usize = tokens_per_image.iter().sum::<usize>().saturating_sub(pads);
    let mut out = Vec::with_capacity(ids.len() + extra);
    let mut counts = tokens_per_image.iter().copied();
    for &id in ids {
        if id == image_pad {
            // As many counts as pads (checked above).
            out.extend(std::iter::repeat_n(image_pad, counts.next().unwrap_or(1)));
        } else {
            out.push(id);
        }
    }
    Ok(out)
}

/// What [`Qwen2VlProcessor::process`] makes of a chat.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorOutput {
    /// The rendered chat, one `<|image_pad|>` per image (before expansion).
    pub text: String,
    /// Token ids with each image's pad expanded (`input_ids`).
    pub input_ids: Vec<u32>,
    /// The images' patches and grids.
    pub images: ProcessedImages,
}

/// Qwen2-VL's processor (transformers' `Qwen2VLProcessor`): chat template, tokenizer and image
/// processor together.
#[derive(Debug)]
pub struct Qwen2VlProcessor {
    /// The tokenizer with its chat template.
    pub tokenizer: Qwen2VlTokenizer,
    /// The image processor.
    pub image_processor: Qwen2VlImageProcessor,
}

impl Qwen2VlProcessor {
    /// The processor of a model directory.
    pub fn from_files(files: &ModelFiles) -> Result<Self> {
        Ok(Self {
            tokenizer: Qwen2VlTokenizer::from_files(files)?,
            image_processor: Qwen2VlImageProcessor::new(ImageProcessorConfig::from_file(
                &files.image_processor,
            )?),
        })
    }

    /// Renders `messages` with the chat template, tokenizes the text, processes `images` (one per
    /// `{"type": "image"}` part, in order) and expands each image's pad to its token count.
    /// Errors: the template fails, or the pads and images differ in number.
    pub fn process(
        &self,
        messages: &[Message],
        images: &[RgbImage],
        add_generation_prompt: bool,
    ) -> Result<ProcessorOutput> {
        let text = self
            .tokenizer
            .apply_chat_template(messages, add_generation_prompt)?;
        let ids = self.tokenizer.encode(&text)?;
        let pad = self.tokenizer.special().image_pad;
        let pads = ids.iter().filter(|&&id| id == pad).count();
        if pads != images.len() {
            // Checked before the (costly) image processing.
            return Err(HfError::ImageCountMismatch {
                token: IMAGE_PAD,
                pads,
                images: images.len(),
            });
        }
        let processed = self.image_processor.preprocess(images)?;
        let counts: Vec<usize> = processed
            .grid_thw
            .iter()
            .map(|&g| self.image_processor.num_image_tokens(g))
            .collect();
        let input_ids = expand_image_pads(&ids, pad, &counts)?;
        Ok(ProcessorOutput {
            text,
            input_ids,
            images: processed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::resample::tests::{fixture_u8, PILLOW_FIXTURE};
    use crate::hf::tokenizer::tests::{word_level_tokenizer, QWEN2_VL_TEMPLATE};
    use crate::hf::tokenizer::{ChatTemplate, Part};
    use safetensors::SafeTensors;
    use std::fs;

    #[test]
    fn smart_resize_matches_transformers() {
        // (height, width, min_pixels, max_pixels) -> transformers 5.25's smart_resize.
        let cases = [
            ((100, 150, 3136, 31360), (112, 140)),
            ((300, 200, 3136, 31360), (196, 140)),
            ((600, 800, 3136, 512 * 28 * 28), (532, 728)),
            ((600, 800, 3136, 1024 * 28 * 28), (588, 812)),
            // 1.5 and 2.5 patches-of-28 both round to 2 (Python rounds ties to even).
            ((42, 70, 3136, 1003520), (56, 56)),
            ((70, 98, 3136, 1003520), (56, 112)),
            ((10, 10, 3136, 1003520), (56, 56)),
            ((20, 3000, 3136, 1003520), (28, 2996)),
            ((1, 200, 3136, 1003520), (28, 812)),
            ((4000, 3000, 3136, 1003520), (1148, 840)),
            ((56, 56, 3136, 3136), (56, 56)),
            ((14, 2800, 3136, 31360), (28, 812)),
        ];
        for ((h, w, min, max), expected) in cases {
            assert_eq!(
                smart_resize(h, w, 28, min, max).unwrap(),
                expected,
                "{h}x{w} in [{min}, {max}]"
            );
        }
        match smart_resize(1, 201, 28, 3136, 1003520) {
            Err(e @ HfError::BadImage { .. }) => assert!(e.to_string().contains("aspect ratio"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            smart_resize(0, 5, 28, 3136, 1003520),
            Err(HfError::BadImage { .. })
        ));
    }

    /// A `[C, H, W]` image whose value at (c, y, x) is `c * 1e6 + y * 1e3 + x`.
    fn coordinate_image(height: usize, width: usize) -> Vec<f32> {
        let mut chw = Vec::with_capacity(3 * height * width);
        for c in 0..3 {
            for y in 0..height {
                for x in 0..width {
                    chw.push((c * 1_000_000 + y * 1000 + x) as f32);
                }
            }
        }
        chw
    }

    /// numpy's `reshape(C, gh/m, m, P, gw/m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)`, a temporal
    /// axis of `t` broadcast copies inserted after C, then `reshape(gh * gw, -1)`, computed as a
    /// strided walk over the permuted view.
    fn naive_patches(chw: &[f32], height: usize, width: usize, p: usize, m: usize, t: usize) -> Vec<f32> {
        let (gh, gw) = (height / p, width / p);
        let dims = [3, gh / m, m, p, gw / m, m, p];
        let mut strides = [0usize; 7];
        let mut s = 1;
        for k in (0..7).rev() {
            strides[k] = s;
            s *= dims[k];
        }
        // Permuted axes, with the temporal axis (stride 0) after the channel axis.
        let order = [1, 4, 2, 5, 0, usize::MAX, 3, 6];
        let view_dims: Vec<usize> = order
            .iter()
            .map(|&a| if a == usize::MAX { t } else { dims[a] })
            .collect();
        let view_strides: Vec<usize> = order
            .iter()
            .map(|&a| if a == usize::MAX { 0 } else { strides[a] })
            .collect();
        let total: usize = view_dims.iter().product();
        (0..total)
            .map(|mut flat| {
                let mut offset = 0;
                for k in (0..8).rev() {
                    offset += (flat % view_dims[k]) * view_strides[k];
                    flat /= view_dims[k];
                }
                chw[offset]
            })
            .collect()
    }

    #[test]
    fn patch_order_matches_the_numpy_reshape() {
        for (height, width, p, m, t) in [
            (56, 84, 14, 2, 2),
            (28, 28, 14, 2, 2),
            (12, 18, 3, 2, 3),
            (8, 12, 2, 1, 1),
        ] {
            let config = ImageProcessorConfig {
                patch_size: p,
                merge_size: m,
                temporal_patch_size: t,
                ..Default::default()
            };
            let chw = coordinate_image(height, width);
            let mut out = Vec::new();
            let grid = Qwen2VlImageProcessor::new(config).patchify(&chw, height, width, &mut out);
            assert_eq!(grid, (height / p, width / p));
            assert_eq!(
                out,
                naive_patches(&chw, height, width, p, m, t),
                "{height}x{width} p{p} m{m} t{t}"
            );
        }
    }

    #[test]
    fn transparency_composites_onto_white_as_pillow() {
        let bytes = fs::read(PILLOW_FIXTURE).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, expected) = fixture_u8(&st, "over_white");
        // Row a, column c: channel value c with alpha a.
        let rgba = RgbaImage::from_fn(256, 256, |c, a| image::Rgba([c as u8, c as u8, c as u8, a as u8]));
        let rgb = to_rgb(&DynamicImage::ImageRgba8(rgba));
        let red: Vec<u8> = rgb.pixels().map(|p| p[0]).collect();
        assert_eq!(red, expected);
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(2, 1, image::Luma([9])));
        assert!(to_rgb(&grey).pixels().all(|p| p.0 == [9, 9, 9]));
    }

    #[test]
    fn config_reads_hub_and_5x_layouts() {
        let path = Path::new("preprocessor_config.json");
        let hub: Value = serde_json::json!({
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "rescale_factor": 0.00392156862745098, "do_convert_rgb": true,
            "image_processor_type": "Qwen2VLImageProcessor"
        });
        let c = ImageProcessorConfig::from_json(&hub, path).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (3136, 12845056));
        assert_eq!(c.factor(), 28);
        let v5: Value =
            serde_json::json!({"size": {"shortest_edge": 100, "longest_edge": 31360}, "image_mean": 0.5});
        let c = ImageProcessorConfig::from_json(&v5, path).unwrap();
        assert_eq!((c.min_pixels, c.max_pixels, c.image_mean), (100, 31360, [0.5; 3]));
        // min_pixels/max_pixels override size, as in `Qwen2VLImageProcessorPil.__init__`.
        let both: Value =
            serde_json::json!({"size": {"shortest_edge": 100, "longest_edge": 31360}, "max_pixels": 5000});
        assert_eq!(
            ImageProcessorConfig::from_json(&both, path).unwrap().max_pixels,
            5000
        );
        assert_eq!(
            ImageProcessorConfig::from_json(&serde_json::json!({}), path).unwrap(),
            ImageProcessorConfig::default()
        );
        for bad in [
            serde_json::json!({"resample": 2}),
            serde_json::json!({"patch_size": "14"}),
            serde_json::json!({"patch_size": 0}),
            serde_json::json!({"image_std": [1, 2]}),
            serde_json::json!({"do_resize": 1}),
            serde_json::json!({"min_pixels": 10, "max_pixels": 5}),
        ] {
            match ImageProcessorConfig::from_json(&bad, path) {
                Err(e @ HfError::Invalid { .. }) => {
                    assert!(e.to_string().contains("preprocessor_config.json"), "{e}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn preprocess_shapes_and_values() {
        let processor = Qwen2VlImageProcessor::new(ImageProcessorConfig {
            max_pixels: 31360,
            ..Default::default()
        });
        let white = RgbImage::from_pixel(150, 100, image::Rgb([255, 255, 255]));
        let black = RgbImage::from_pixel(200, 300, image::Rgb([0, 0, 0]));
        let out = processor.preprocess(&[white, black]).unwrap();
        assert_eq!(out.grid_thw, [[1, 8, 10], [1, 14, 10]]);
        assert_eq!(out.patch_dim, 1176);
        assert_eq!(out.pixel_values.len(), (80 + 140) * 1176);
        assert_eq!(processor.num_image_tokens(out.grid_thw[0]), 20);
        let c = &processor.config;
        let white_red = ((255.0 * c.rescale_factor) as f32 - c.image_mean[0] as f32) / c.image_std[0] as f32;
        let white_blue = ((255.0 * c.rescale_factor) as f32 - c.image_mean[2] as f32) / c.image_std[2] as f32;
        let black_blue = (0.0 - c.image_mean[2] as f32) / c.image_std[2] as f32;
        // Within a patch the red plane comes first and the blue plane last.
        assert_eq!(
            (out.pixel_values[0], out.pixel_values[1175]),
            (white_red, white_blue)
        );
        assert_eq!(out.pixel_values[80 * 1176 + 1175], black_blue);
        let tensor = out.pixel_values_tensor(&Device::Cpu).unwrap();
        assert_eq!(tensor.dims(), [220, 1176]);

        let fixed = Qwen2VlImageProcessor::new(ImageProcessorConfig {
            do_resize: false,
            ..Default::default()
        });
        assert!(matches!(
            fixed.preprocess(&[RgbImage::new(30, 28)]),
            Err(HfError::BadImage { .. })
        ));
        assert_eq!(
            fixed.preprocess(&[RgbImage::new(56, 28)]).unwrap().grid_thw,
            [[1, 2, 4]]
        );
    }

    #[test]
    fn expands_each_pad_by_its_image() {
        let ids = [1, 9, 2, 9, 3];
        assert_eq!(
            expand_image_pads(&ids, 9, &[2, 3]).unwrap(),
            [1, 9, 9, 2, 9, 9, 9, 3]
        );
        assert_eq!(expand_image_pads(&[1, 2], 9, &[]).unwrap(), [1, 2]);
        match expand_image_pads(&ids, 9, &[4]) {
            Err(HfError::ImageCountMismatch { pads, images, .. }) => assert_eq!((pads, images), (2, 1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn loads_images_and_names_undecodable_files() {
        let tmp = tempfile::tempdir().unwrap();
        let processor = Qwen2VlImageProcessor::new(ImageProcessorConfig::default());
        let png = tmp.path().join("a.png");
        let rgba = RgbaImage::from_pixel(3, 2, image::Rgba([10, 20, 30, 0]));
        rgba.save(&png).unwrap();
        assert!(processor
            .load_image(&png)
            .unwrap()
            .pixels()
            .all(|p| p.0 == [255, 255, 255]));
        let jpeg = tmp.path().join("b.jpg");
        RgbImage::from_pixel(8, 8, image::Rgb([200, 100, 50]))
            .save(&jpeg)
            .unwrap();
        assert_eq!(processor.load_image(&jpeg).unwrap().dimensions(), (8, 8));
        let bad = tmp.path().join("c.png");
        fs::write(&bad, b"\x89PNG\r\n\x1a\n broken").unwrap();
        match processor.load_image(&bad) {
            Err(e @ HfError::Image { .. }) => assert!(e.to_string().contains("c.png"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            processor.load_image(&tmp.path().join("none.png")),
            Err(HfError::Io { .. })
        ));
        let strict = Qwen2VlImageProcessor::new(ImageProcessorConfig {
            do_convert_rgb: false,
            ..Default::default()
        });
        assert!(matches!(strict.load_image(&png), Err(HfError::Invalid { .. })));
    }

    #[test]
    fn processor_expands_the_rendered_chat() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tokenizer.json");
        fs::write(&path, word_level_tokenizer(None)).unwrap();
        let template = ChatTemplate::new(QWEN2_VL_TEMPLATE, Path::new("chat_template.json"), None).unwrap();
        let processor = Qwen2VlProcessor {
            tokenizer: Qwen2VlTokenizer::new(&path, template).unwrap(),
            image_processor: Qwen2VlImageProcessor::new(ImageProcessorConfig::default()),
        };
        let messages = [Message::parts(
            "user",
            vec![Part::Image, Part::Text { text: "hello".into() }],
        )];
        let image = RgbImage::new(56, 84);
        let out = processor
            .process(&messages, std::slice::from_ref(&image), true)
            .unwrap();
        assert_eq!(out.images.grid_thw, [[1, 6, 4]]);
        let pads = out.input_ids.iter().filter(|&&id| id == 11).count();
        assert_eq!(pads, 6, "24 patches / merge 2x2");
        let start = out.input_ids.iter().position(|&id| id == 9).unwrap();
        assert_eq!(out.input_ids[start + 7], 10, "vision_start, 6 pads, vision_end");
        assert!(out.text.ends_with("<|im_start|>assistant\n"));
        match processor.process(&messages, &[], true) {
            Err(HfError::ImageCountMismatch { pads, images, .. }) => assert_eq!((pads, images), (1, 0)),
            other => panic!("{other:?}"),
        }
    }
}
