//! A Hugging Face Qwen2-VL checkpoint as a [`Policy`], prompted as R1-SGG
//! prompts it ([`crate::data::prompt`]): each sample's chat (system turn, the
//! image and the request) rendered by the model's chat template and
//! processed by its processor (Pillow-exact resize to at most
//! [`QwenOptions::max_pixels`]); SFT targets in R1-SGG's fenced JSON.
//!
//! **Batches.** Prompts of different lengths are padded on the left and
//! completions on the right, TRL's layout (`GRPOTrainer`: left-padded
//! prompt ids, then the completion ids): every completion starts in the same
//! column, so its log-probs are one slice of the hidden states, and the
//! last prompt token of every row is the last prompt column. Position ids
//! are transformers' (`get_rope_index` over the attention mask: padding
//! takes no position, so a padded row's positions and logits are its own
//! alone, tested in `model::qwen2_vl`).
//!
//! **Rollouts** ([`QwenPolicy::generate_with`]): the prompts of a batch run
//! once through the model (each image encoded once, each prompt's KV cache
//! computed once), then the cache and its rope deltas are repeated for the
//! `G` completions of each prompt ([`KvCache::repeat_interleave`]), room is
//! made for the completion length at once ([`KvCache::reserve`]), and each
//! step samples every live row through the fused sampler; a row leaves the
//! batch when it writes `<|im_end|>` or `<|endoftext|>` (or the config's
//! EOS), and generation stops at the length limit.
//!
//! **Teacher-forced log-probs** ([`Policy::logprobs`]): the vision tower runs
//! once per distinct image of the batch (GRPO's `G` rows of one prompt
//! share it; the gradients of its repeats add up in the tower), then the
//! decoder over prompt and completion, and the completion's log-probs come
//! from the fused LM-head op on the completion's hidden states only.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use grpo_kernels::candle::fused_linear_logprobs;
use grpo_kernels::{FusedLinearConfig, LogProbConfig, SamplingConfig};

use super::{LossOn, Policy};
use crate::data::format::AnswerForm;
use crate::data::prompt::{messages, sft_target, PromptStyle, SystemPrompt};
use crate::data::scene::SceneGraph;
use crate::data::Sample;
use crate::hf::pretrained::{Pretrained, PretrainedError};
use crate::hf::processor::ProcessorOutput;
use crate::hf::weights::{load_weights, ExtraFile, DEFAULT_MAX_SHARD_BYTES};
use crate::hf::ModelFiles;
use crate::model::qwen2_vl::{Checkpointing, Inputs, KvCache, Qwen2Vl};
use crate::train::checkpoint::{self, TrainingState};
use crate::train::optim::AdamW;
use crate::train::rollout::{sample_completions, Decoder};

/// The file of a Hugging Face checkpoint directory that holds the trainer's state.
pub const TRAINER_STATE: &str = "trainer_state.safetensors";

/// How a Qwen2-VL checkpoint is loaded and prompted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QwenOptions {
    /// The weights' dtype (BF16 or F32).
    pub dtype: DType,
    /// The system prompt and vocabulary of the prompts.
    pub prompt: PromptStyle,
    /// The processor's `max_pixels` (R1-SGG: `512*28*28` in GRPO,
    /// `1024*28*28` in SFT and evaluation); `None` keeps the model's.
    pub max_pixels: Option<u64>,
    /// Leave the vision tower out of training (its output is detached).
    pub freeze_vision: bool,
    /// Which blocks run under gradient checkpointing.
    pub checkpointing: Checkpointing,
}

/// A Qwen2-VL checkpoint, its processor, and R1-SGG's prompts.
pub struct QwenPolicy {
    /// The model, its weights and processor.
    pub pretrained: Pretrained,
    /// How it was loaded and is prompted.
    pub options: QwenOptions,
    device: Device,
    /// Tokens that end a completion.
    stop: Vec<u32>,
}

impl QwenPolicy {
    /// Opens the model directory `dir` ([`Pretrained::load`]) with `options`.
    pub fn load(
        dir: &Path,
        device: &Device,
        options: QwenOptions,
    ) -> std::result::Result<Self, PretrainedError> {
        let mut pretrained = Pretrained::load(dir, options.dtype, device)?;
        if let Some(max) = options.max_pixels {
            pretrained.processor.image_processor.config.max_pixels = max;
        }
        pretrained.model.set_checkpointing(options.checkpointing);
        let special = *pretrained.processor.tokenizer.special();
        let mut stop = vec![special.im_end, special.endoftext];
        stop.extend(&pretrained.config.eos_token_id);
        stop.sort_unstable();
        stop.dedup();
        Ok(Self {
            pretrained,
            options,
            device: device.clone(),
            stop,
        })
    }

    fn model(&self) -> &Qwen2Vl {
        &self.pretrained.model
    }

    /// The tokens that end a completion: `<|im_end|>`, `<|endoftext|>` and
    /// the config's `eos_token_id`.
    pub fn stop_tokens(&self) -> &[u32] {
        &self.stop
    }

    /// The processed prompt of `sample`: its chat with the generation prompt.
    fn prompt(&self, sample: &Sample) -> Result<ProcessorOutput> {
        let chat = messages(&self.options.prompt, None);
        self.pretrained
            .processor
            .process(&chat, std::slice::from_ref(&sample.image), true)
            .map_err(|e| candle_core::Error::Msg(format!("sample {}: {e}", sample.id)))
    }

    /// The processed prompts of `samples`.
    fn prompts(&self, samples: &[&Sample]) -> Result<Vec<ProcessorOutput>> {
        samples.iter().map(|s| self.prompt(s)).collect()
    }

    /// The prompts of `samples` as generation prefills them: left-padded,
    /// with the attention mask, every image's pixels and grid (to run
    /// another implementation on the very same inputs).
    pub fn prompt_inputs(&self, samples: &[&Sample]) -> Result<Inputs> {
        let prompts = self.prompts(samples)?;
        let rows: Vec<usize> = (0..prompts.len()).collect();
        Ok(self.batch(&prompts, &rows, &[], true)?.inputs)
    }

    /// Every image of `prompts` as `pixel_values` `[patches, patch_dim]` in
    /// the model's dtype, and their grids, in order.
    fn pixels<'p>(
        &self,
        prompts: impl Iterator<Item = &'p ProcessorOutput>,
    ) -> Result<(Tensor, Vec<[usize; 3]>)> {
        let (mut values, mut grids) = (Vec::new(), Vec::new());
        for prompt in prompts {
            values.extend_from_slice(&prompt.images.pixel_values);
            grids.extend_from_slice(&prompt.images.grid_thw);
        }
        let patch_dim = self.pretrained.config.vision.patch_dim();
        let n = values.len() / patch_dim;
        let values = Tensor::from_vec(values, (n, patch_dim), &self.device)?.to_dtype(self.options.dtype)?;
        Ok((values, grids))
    }

    /// Rows `prompts[rows[r]] ++ continuations[r]`, prompts padded on the
    /// left to the longest and continuations on the right (see the module
    /// docs), with the pixels of every row's image when `pixels`.
    fn batch(
        &self,
        prompts: &[ProcessorOutput],
        rows: &[usize],
        continuations: &[Vec<u32>],
        pixels: bool,
    ) -> Result<Batch> {
        let pad = self.pretrained.processor.tokenizer.special().endoftext;
        let p = rows
            .iter()
            .map(|&u| prompts[u].input_ids.len())
            .max()
            .unwrap_or(0);
        let c = continuations.iter().map(Vec::len).max().unwrap_or(0);
        let (mut ids, mut mask) = (Vec::with_capacity(rows.len() * (p + c)), Vec::new());
        for (r, &u) in rows.iter().enumerate() {
            let prompt = &prompts[u].input_ids;
            let cont = continuations.get(r).map_or(&[][..], Vec::as_slice);
            let (lead, trail) = (p - prompt.len(), c - cont.len());
            ids.extend(std::iter::repeat_n(pad, lead));
            ids.extend_from_slice(prompt);
            ids.extend_from_slice(cont);
            ids.extend(std::iter::repeat_n(pad, trail));
            mask.extend(std::iter::repeat_n(0u8, lead));
            mask.extend(std::iter::repeat_n(1u8, prompt.len() + cont.len()));
            mask.extend(std::iter::repeat_n(0u8, trail));
        }
        let (b, t) = (rows.len(), p + c);
        let (pixel_values, image_grid_thw) = if pixels {
            let (values, grids) = self.pixels(rows.iter().map(|&u| &prompts[u]))?;
            (Some(values), grids)
        } else {
            let grids = rows
                .iter()
                .flat_map(|&u| prompts[u].images.grid_thw.iter().copied());
            (None, grids.collect())
        };
        let inputs = Inputs {
            input_ids: Tensor::from_slice(&ids, (b, t), &self.device)?,
            attention_mask: Some(Tensor::from_slice(&mask, (b, t), &self.device)?),
            pixel_values,
            image_grid_thw,
            position_ids: None,
        };
        Ok(Batch {
            inputs,
            ids,
            mask,
            prompt_len: p,
        })
    }

    /// [`Policy::generate`], the prompt's cache shared by its `group`
    /// completions when `share_prompt` (else each completion's row runs its
    /// prompt and image itself, as a plain batch of `B * group` prompts
    /// would: the reference the shared path is tested against).
    pub fn generate_with(
        &self,
        samples: &[&Sample],
        group: usize,
        max_new: usize,
        sampling: &SamplingConfig,
        share_prompt: bool,
    ) -> Result<Vec<Vec<u32>>> {
        let prompts = self.prompts(samples)?;
        let rows: Vec<usize> = if share_prompt {
            (0..prompts.len()).collect()
        } else {
            (0..prompts.len())
                .flat_map(|u| std::iter::repeat_n(u, group))
                .collect()
        };
        let batch = self.batch(&prompts, &rows, &[], true)?;
        let shared = if share_prompt { group } else { 1 };
        rollout(self.model(), &batch.inputs, shared, max_new, sampling, &self.stop)
    }
}

/// Samples `group` completions of each row of `inputs` (a left-padded
/// prompt batch with its images), rows `r * group .. (r + 1) * group` for
/// prompt `r`: the prompts run once ([`Qwen2Vl::prefill`]: every image
/// encoded once, every prompt's KV cache computed once), the cache and the
/// last logits repeated for the completions, then [`sample_completions`]
/// until a token of `stop` or `max_new` tokens (`stop` empty: exactly
/// `max_new`, as the real-size benchmark generates). What
/// [`QwenPolicy::generate_with`] runs, exposed for the benchmarks on
/// random-weight models, which have no tokenizer.
pub fn rollout(
    model: &Qwen2Vl,
    inputs: &Inputs,
    group: usize,
    max_new: usize,
    sampling: &SamplingConfig,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let (mut cache, mut logits) = model.prefill(inputs)?;
    if group > 1 {
        cache = cache.repeat_interleave(group)?;
        let b = logits.dim(0)?;
        let index: Vec<u32> = (0..b as u32)
            .flat_map(|u| std::iter::repeat_n(u, group))
            .collect();
        let n = index.len();
        logits = logits.index_select(&Tensor::from_vec(index, n, logits.device())?, 0)?;
    }
    cache.reserve(max_new)?;
    let mut decoder = QwenDecoder { model, cache };
    sample_completions(&mut decoder, logits, max_new, sampling, stop)
}

impl QwenPolicy {
    /// Writes the model to the Hugging Face directory `dir`
    /// ([`Pretrained::save_with`]) with the trainer's state beside it as
    /// [`TRAINER_STATE`] (AdamW's moments and master weights, the step and
    /// stage: [`checkpoint`]'s layout without the weights), in one atomic
    /// swap: `dir` holds the previous checkpoint or the complete new one.
    pub fn save_checkpoint(&self, dir: &Path, opt: &AdamW, state: &TrainingState) -> anyhow::Result<()> {
        let (tensors, metadata) =
            checkpoint::contents(&dir.join(TRAINER_STATE), &VarMap::new(), Some(opt), state)?;
        let extra = [ExtraFile {
            name: TRAINER_STATE,
            tensors: &tensors,
            metadata: &metadata,
        }];
        self.pretrained.save_with(dir, DEFAULT_MAX_SHARD_BYTES, &extra)?;
        Ok(())
    }

    /// Restores a checkpoint written by [`QwenPolicy::save_checkpoint`]:
    /// the weights into this model, the optimizer state into `opt` (built
    /// over the same trainable weights, with master weights if they were);
    /// returns where training stood. Each file is checked whole before it
    /// changes anything (a missing, extra or misshapen tensor is an error
    /// naming it).
    pub fn resume(&self, dir: &Path, opt: &mut AdamW) -> anyhow::Result<TrainingState> {
        let files = ModelFiles::locate(dir)?;
        let state_file = dir.join(TRAINER_STATE);
        // The optimizer first: it is checked whole before it changes, then the weights.
        let state = checkpoint::load(&state_file, &mut VarMap::new(), Some(opt))?;
        load_weights(
            &files.weights,
            &self.pretrained.vars,
            self.pretrained.config.tie_word_embeddings,
        )?;
        Ok(state)
    }
}

/// A batch of prompts (and continuations) as model inputs, with the host
/// copies of its ids and mask `[B, T]` row-major.
struct Batch {
    inputs: Inputs,
    ids: Vec<u32>,
    mask: Vec<u8>,
    /// Columns of (left-padded) prompt.
    prompt_len: usize,
}

/// Qwen2-VL decoding a batch; finished rows leave it.
struct QwenDecoder<'a> {
    model: &'a Qwen2Vl,
    cache: KvCache,
}

impl Decoder for QwenDecoder<'_> {
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        Ok(self.model.decode_step(&mut self.cache, tokens)?)
    }

    fn keep_rows(&mut self, rows: &[usize]) -> Result<bool> {
        self.cache = self.cache.select_rows(rows)?;
        Ok(true)
    }
}

impl Policy for QwenPolicy {
    fn device(&self) -> &Device {
        &self.device
    }

    fn vars(&self) -> &VarMap {
        &self.pretrained.vars
    }

    fn is_trainable(&self, name: &str) -> bool {
        !(self.options.freeze_vision && name.starts_with("visual."))
    }

    /// R1-SGG's format reward wants `<think>...</think><answer>...</answer>`
    /// under the think system prompt; under the plain one the answer alone.
    fn answer_form(&self) -> AnswerForm {
        match self.options.prompt.system {
            SystemPrompt::Think => AnswerForm::Strict,
            SystemPrompt::Plain => AnswerForm::Relaxed,
        }
    }

    /// [`sft_target`] and `<|im_end|>`, as the chat template closes the
    /// assistant's turn. The template's newline after `<|im_end|>` is left
    /// out: generation stops before it.
    fn answer_tokens(&self, graph: &SceneGraph) -> Result<Vec<u32>> {
        let tok = &self.pretrained.processor.tokenizer;
        let mut ids = tok.encode(&sft_target(graph)).map_err(candle_core::Error::wrap)?;
        ids.push(tok.special().im_end);
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.pretrained
            .processor
            .tokenizer
            .decode(ids, true)
            .map_err(candle_core::Error::wrap)
    }

    fn logprobs(
        &self,
        samples: &[&Sample],
        completions: &[Vec<u32>],
        on: LossOn,
        temperature: f32,
    ) -> Result<(Tensor, Tensor)> {
        if samples.len() != completions.len() || samples.is_empty() {
            candle_core::bail!(
                "logprobs: {} samples for {} completions (one each, at least one)",
                samples.len(),
                completions.len()
            );
        }
        // Consecutive repeats of a sample share its prompt and image.
        let mut unique: Vec<&Sample> = Vec::new();
        let mut rows = Vec::with_capacity(samples.len());
        for &s in samples {
            if !unique.last().is_some_and(|&u| std::ptr::eq(u, s)) {
                unique.push(s);
            }
            rows.push(unique.len() - 1);
        }
        let prompts = self.prompts(&unique)?;
        // At least one completion column, so that the slice below is never empty.
        let mut padded = completions.to_vec();
        if padded.iter().all(Vec::is_empty) {
            padded[0].push(self.pretrained.processor.tokenizer.special().endoftext);
        }
        let batch = self.batch(&prompts, &rows, &padded, false)?;
        let (b, t) = batch.inputs.input_ids.dims2()?;

        // The vision tower once per distinct image, its rows repeated per row.
        let (px, grids) = self.pixels(prompts.iter())?;
        let mut vision = self.model().vision_embeds(&px, &grids)?;
        if self.options.freeze_vision {
            vision = vision.detach();
        }
        let merge = self.pretrained.config.vision.merge_unit();
        let tokens: Vec<usize> = prompts
            .iter()
            .map(|p| p.images.grid_thw.iter().map(|g| g[0] * g[1] * g[2] / merge).sum())
            .collect();
        let offsets: Vec<usize> = tokens
            .iter()
            .scan(0, |acc, &n| {
                *acc += n;
                Some(*acc - n)
            })
            .collect();
        let index: Vec<u32> = rows
            .iter()
            .flat_map(|&u| (offsets[u]..offsets[u] + tokens[u]).map(|i| i as u32))
            .collect();
        let n = index.len();
        let vision = vision.index_select(&Tensor::from_vec(index, n, &self.device)?, 0)?;
        let hidden = self
            .model()
            .hidden_states_with_image_embeds(&batch.inputs, &vision)?;

        // Hidden state `start + j` predicts target `start + 1 + j`.
        let (start, len) = match on {
            LossOn::Answer => (batch.prompt_len - 1, t - batch.prompt_len),
            LossOn::All => (0, t - 1),
        };
        let special = self.pretrained.processor.tokenizer.special();
        let vision_tokens = [special.vision_start, special.vision_end, special.image_pad];
        let mut mask = Vec::with_capacity(b * len);
        for r in 0..b {
            mask.extend((start + 1..start + 1 + len).map(|j| {
                let k = r * t + j;
                u8::from(batch.mask[k] != 0 && !vision_tokens.contains(&batch.ids[k]))
            }));
        }
        let mask = Tensor::from_vec(mask, (b, len), &self.device)?;
        let targets = batch.inputs.input_ids.narrow(1, start + 1, len)?.contiguous()?;
        let cfg = FusedLinearConfig {
            logprob: LogProbConfig {
                ignore_index: None,
                temperature,
                ..LogProbConfig::default()
            },
            ..FusedLinearConfig::default()
        };
        let out = fused_linear_logprobs(
            &hidden.narrow(1, start, len)?,
            &self.model().lm_head_weight(),
            &targets,
            Some(&mask),
            &cfg,
        )?;
        Ok((out.logp, mask))
    }

    fn generate(
        &self,
        samples: &[&Sample],
        group: usize,
        max_new: usize,
        sampling: &SamplingConfig,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_with(samples, group, max_new, sampling, true)
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        Ok(self.model().backward(loss)?)
    }

    /// The model as loaded from its directory (the weights GRPO started
    /// from, even when resuming: the directory is never written).
    fn reference(&self) -> Result<Box<dyn Policy>> {
        let options = QwenOptions {
            checkpointing: Checkpointing::default(),
            ..self.options
        };
        let reference = QwenPolicy::load(&self.pretrained.files.dir, &self.device, options)
            .map_err(candle_core::Error::wrap)?;
        Ok(Box::new(reference))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::data::scene::SYNTHETIC;
    use crate::data::stream::TrainSet;
    use crate::data::synthetic::{generate_split, Split};
    use crate::train::grpo::{grpo, grpo_defaults, LossVariant};
    use crate::train::sft::{sft, Augment, SftConfig};
    use crate::train::{adamw, Hooks, Learner, Schedule};

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen2_vl/untied")
    }

    fn policy(dtype: DType, system: SystemPrompt) -> QwenPolicy {
        let options = QwenOptions {
            dtype,
            prompt: PromptStyle {
                system,
                vocabulary: Some(SYNTHETIC),
            },
            max_pixels: None,
            freeze_vision: false,
            checkpointing: Checkpointing {
                text: true,
                vision: true,
            },
        };
        QwenPolicy::load(&fixture(), &Device::Cpu, options).unwrap()
    }

    /// Every step's record; `Ok(false)` after step `stop_after`.
    struct Collect {
        records: Vec<serde_json::Value>,
        stop_after: Option<usize>,
    }

    impl Hooks for Collect {
        fn after_step(&mut self, _: &str, step: usize, record: serde_json::Value, _: &AdamW) -> Result<bool> {
            self.records.push(record);
            Ok(self.stop_after != Some(step))
        }
    }

    fn collect(stop_after: Option<usize>) -> Collect {
        Collect {
            records: Vec::new(),
            stop_after,
        }
    }

    fn sft_config(steps: usize, loss_on: LossOn) -> SftConfig {
        SftConfig {
            steps,
            batch: 2,
            accumulate: 2,
            lr: 2e-3,
            schedule: Schedule::WarmupConstant { warmup: 0.0 },
            max_grad_norm: 1.0,
            seed: 3,
            augment: Augment::R1Sgg,
            objects_only: false,
            loss_on,
        }
    }

    /// The answer's tokens are what the template's rendering of the whole
    /// chat tokenizes to after the prompt (through `<|im_end|>`), so the
    /// model is trained on the tokens it is later asked to generate.
    #[test]
    fn answer_tokens_continue_the_prompt_as_the_template_renders_it() {
        let q = policy(DType::F32, SystemPrompt::Plain);
        let s = &generate_split(Split::Train, 1, 0)[0];
        let prompt = q.prompt(s).unwrap();
        let answer = q.answer_tokens(&s.graph).unwrap();
        let chat = messages(&q.options.prompt, Some(&sft_target(&s.graph)));
        let full = q
            .pretrained
            .processor
            .process(&chat, std::slice::from_ref(&s.image), false)
            .unwrap();
        let n = prompt.input_ids.len();
        assert_eq!(full.input_ids[..n], prompt.input_ids[..]);
        assert_eq!(full.input_ids[n..n + answer.len()], answer[..]);
        // The template's newline after <|im_end|> ends the chat.
        assert_eq!(full.input_ids.len(), n + answer.len() + 1);
        assert_eq!(q.decode(&answer).unwrap(), sft_target(&s.graph));
    }

    /// Log-probs of completions after left-padded prompts equal those of
    /// each row alone, with the image encoded once for repeated rows; with
    /// `LossOn::All` the mask skips padding and the vision tokens.
    #[test]
    fn batched_logprobs_equal_each_rows_alone() {
        let q = policy(DType::F32, SystemPrompt::Think);
        let data = generate_split(Split::Shifted, 2, 1);
        let (a, b) = (&data[0], &data[1]);
        let completions = vec![vec![5u32, 6, 7], vec![8, 9], vec![10]];
        let samples = [a, a, b];
        let (logp, mask) = q.logprobs(&samples, &completions, LossOn::Answer, 0.7).unwrap();
        assert_eq!(logp.dims(), &[3, 3]);
        assert_eq!(mask.to_vec2::<u8>().unwrap(), [[1, 1, 1], [1, 1, 0], [1, 0, 0]]);
        for (r, (s, c)) in samples.iter().zip(&completions).enumerate() {
            let (alone, _) = q
                .logprobs(&[*s], std::slice::from_ref(c), LossOn::Answer, 0.7)
                .unwrap();
            let got = logp.get(r).unwrap().narrow(0, 0, c.len()).unwrap();
            crate::model::qwen2_vl::tests::assert_close(&got, &alone.squeeze(0).unwrap(), 1e-5, "row");
        }
        let (all, all_mask) = q.logprobs(&samples, &completions, LossOn::All, 1.0).unwrap();
        let special = *q.pretrained.processor.tokenizer.special();
        let prompt = q.prompt(a).unwrap().input_ids;
        let image_tokens = prompt
            .iter()
            .filter(|&&id| [special.vision_start, special.vision_end, special.image_pad].contains(&id))
            .count();
        // Row 0 is the longest prompt or not: its scored targets are its prompt
        // (less the first token and the image's) and its completion.
        let scored: u32 = all_mask
            .get(0)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(
            scored as usize,
            prompt.len() - 1 - image_tokens + completions[0].len()
        );
        assert_eq!(all.dims(), all_mask.dims());
    }

    /// The prompt's cache shared by its completions samples the very
    /// tokens that each completion's own prompt and image would.
    #[test]
    fn shared_prompt_rollouts_equal_unshared_ones() {
        let q = policy(DType::F32, SystemPrompt::Think);
        let data = generate_split(Split::Shifted, 2, 2);
        let samples: Vec<&Sample> = data.iter().collect();
        let sampling = SamplingConfig {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.9,
            seed: 11,
            ..SamplingConfig::default()
        };
        let shared = q.generate_with(&samples, 3, 12, &sampling, true).unwrap();
        let plain = q.generate_with(&samples, 3, 12, &sampling, false).unwrap();
        assert_eq!(shared, plain);
        assert_eq!(shared.len(), 6);
        assert!(shared.iter().all(|c| !c.is_empty() && c.len() <= 12));
        // A completion ends at its first stop token.
        for c in &shared {
            let stop = c.iter().position(|t| q.stop_tokens().contains(t));
            assert!(stop.is_none_or(|i| i == c.len() - 1), "{c:?}");
        }
        // The group's completions differ (they are sampled, not copied).
        assert!(shared[0] != shared[1] || shared[1] != shared[2]);
    }

    /// SFT steps on a repeated batch lower its loss (bf16 weights with f32
    /// moments and master weights, and f32; accumulation, checkpointing).
    #[test]
    fn sft_lowers_the_loss_of_a_repeated_batch() {
        for (loss_on, dtype) in [(LossOn::Answer, DType::BF16), (LossOn::All, DType::F32)] {
            let q = policy(dtype, SystemPrompt::Plain);
            let train = TrainSet::in_memory(generate_split(Split::Train, 2, 4));
            let mut opt = adamw(&q, 2e-3, true).unwrap();
            let mut hooks = collect(None);
            let learner = Learner {
                policy: &q,
                train: &train,
            };
            sft(learner, &sft_config(6, loss_on), &mut opt, 0, &mut hooks).unwrap();
            let losses: Vec<f64> = hooks
                .records
                .iter()
                .map(|r| r["loss"].as_f64().unwrap())
                .collect();
            assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
            assert!(losses[5] < losses[0] - 0.5, "{loss_on:?}: {losses:?}");
        }
    }

    /// A GRPO step (micro-batches, KL to the reference) gives finite stats.
    #[test]
    fn a_grpo_step_gives_finite_stats() {
        let q = policy(DType::F32, SystemPrompt::Think);
        let train = TrainSet::in_memory(generate_split(Split::Train, 4, 5));
        let mut cfg = grpo_defaults(1, 0);
        cfg.prompts = 2;
        cfg.accumulate = 2;
        cfg.group = 3;
        cfg.max_new = 10;
        cfg.loss.beta = 0.04;
        cfg.rewards.form = q.answer_form();
        let cfg = cfg.with_variant(LossVariant::Bnpo);
        let mut opt = adamw(&q, cfg.lr, true).unwrap();
        let mut hooks = collect(None);
        let learner = Learner {
            policy: &q,
            train: &train,
        };
        grpo(learner, &cfg, &mut opt, 0, &mut hooks).unwrap();
        let r = &hooks.records[0];
        for key in ["reward", "loss", "kl", "ratio_mean", "length"] {
            assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key}: {r}");
        }
        assert_eq!(
            r["generated"].as_u64().unwrap() as f64,
            6.0 * r["length"].as_f64().unwrap()
        );
        assert_eq!(opt.step_count(), 1);
    }

    /// A checkpoint written mid-run and resumed continues exactly as the
    /// run that was not stopped (bf16 weights with f32 master weights).
    #[test]
    fn resume_continues_exactly() {
        // A set per run: its visit counts (R1-SGG's augmentation) start
        // afresh in each process, as here in each run.
        let train = || TrainSet::in_memory(generate_split(Split::Train, 3, 6));
        let (first, rest_a, rest_b) = (train(), train(), train());
        let cfg = sft_config(4, LossOn::Answer);
        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("sft");

        let a = policy(DType::BF16, SystemPrompt::Plain);
        let mut opt_a = adamw(&a, cfg.lr, true).unwrap();
        let learner = |p, t| Learner { policy: p, train: t };
        sft(learner(&a, &first), &cfg, &mut opt_a, 0, &mut collect(Some(1))).unwrap();
        let state = TrainingState {
            stage: "sft".into(),
            step: 2,
            seed: cfg.seed,
            extra: Default::default(),
        };
        a.save_checkpoint(&ckpt, &opt_a, &state).unwrap();
        assert!(ckpt.join("model.safetensors").is_file() && ckpt.join(TRAINER_STATE).is_file());

        let b = policy(DType::BF16, SystemPrompt::Plain);
        let mut opt_b = adamw(&b, cfg.lr, true).unwrap();
        assert_eq!(b.resume(&ckpt, &mut opt_b).unwrap(), state);
        assert_eq!(opt_b.step_count(), 2);
        sft(learner(&a, &rest_a), &cfg, &mut opt_a, 2, &mut collect(None)).unwrap();
        sft(learner(&b, &rest_b), &cfg, &mut opt_b, 2, &mut collect(None)).unwrap();
        let (va, vb) = (a.vars().data().lock().unwrap(), b.vars().data().lock().unwrap());
        for (name, v) in va.iter() {
            let d = crate::model::qwen2_vl::tests::max_abs_diff(v.as_tensor(), vb[name].as_tensor());
            assert_eq!(d, 0.0, "{name}");
        }
        // Without master weights the optimizer cannot take this state.
        let c = policy(DType::BF16, SystemPrompt::Plain);
        let mut opt_c = adamw(&c, cfg.lr, false).unwrap();
        assert!(c.resume(&ckpt, &mut opt_c).is_err());
    }
}
