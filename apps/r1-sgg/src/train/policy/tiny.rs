//! The demo's tiny VLM as a [`Policy`]: a `[B, 3, S, S]` image and the task
//! token as the prompt, the closed-vocabulary tokenizer, answers in the
//! compact `<answer>` form.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;
use grpo_kernels::SamplingConfig;

use super::{LossOn, Policy};
use crate::data::format::{answer_text_with, AnswerForm, BoxRounding};
use crate::data::scene::SceneGraph;
use crate::data::Sample;
use crate::model::tiny_tokenizer::{Tokenizer, EOS, TASK};
use crate::model::{KvCache, Vlm, VlmConfig};
use crate::train::batch::{completion_logprobs, image_batch, token_batch};
use crate::train::rollout::{sample_completions, Decoder};
use crate::train::FORM;

/// The demo's model, its weights and tokenizer.
pub struct TinyPolicy {
    /// Its configuration.
    pub cfg: VlmConfig,
    /// Its weights.
    pub vars: VarMap,
    /// The model on `vars`.
    pub model: Vlm,
    /// The closed-vocabulary tokenizer.
    pub tok: Tokenizer,
    /// How the answers' boxes are rounded to units.
    pub rounding: BoxRounding,
}

impl TinyPolicy {
    fn images(&self, samples: &[&Sample]) -> Result<Tensor> {
        image_batch(samples, self.cfg.image_size as u32, self.model.device())
    }
}

/// The tiny model decoding a batch.
struct TinyDecoder<'a> {
    model: &'a Vlm,
    cache: KvCache,
}

impl Decoder for TinyDecoder<'_> {
    fn step(&mut self, tokens: &Tensor) -> Result<Tensor> {
        self.model.decode_step(&mut self.cache, tokens)
    }

    /// Keeps every row: the demo's recorded results were sampled with the
    /// whole batch in the sampler at every step (its random numbers are
    /// drawn by row), and dropping rows would change them.
    fn keep_rows(&mut self, _rows: &[usize]) -> Result<bool> {
        Ok(false)
    }
}

impl Policy for TinyPolicy {
    fn device(&self) -> &Device {
        self.model.device()
    }

    fn vars(&self) -> &VarMap {
        &self.vars
    }

    fn is_trainable(&self, _name: &str) -> bool {
        true
    }

    fn answer_form(&self) -> AnswerForm {
        FORM
    }

    fn answer_tokens(&self, graph: &SceneGraph) -> Result<Vec<u32>> {
        let mut ids = self.tok.encode(&answer_text_with(graph, None, self.rounding));
        ids.push(EOS);
        Ok(ids)
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(self.tok.decode(ids))
    }

    /// The prompt is the image and the task token, whose own log-prob is
    /// never a target: [`LossOn::All`] is [`LossOn::Answer`].
    fn logprobs(
        &self,
        samples: &[&Sample],
        completions: &[Vec<u32>],
        _on: LossOn,
        temperature: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (tokens, mask) = token_batch(completions, self.device())?;
        completion_logprobs(&self.model, &self.images(samples)?, &tokens, &mask, temperature)
    }

    fn generate(
        &self,
        samples: &[&Sample],
        group: usize,
        max_new: usize,
        sampling: &SamplingConfig,
    ) -> Result<Vec<Vec<u32>>> {
        let repeated: Vec<&Sample> = samples
            .iter()
            .flat_map(|s| std::iter::repeat_n(*s, group))
            .collect();
        let prompt = Tensor::full(TASK, (repeated.len(), 1), self.device())?;
        let (cache, logits) = self.model.prefill(&self.images(&repeated)?, &prompt)?;
        let mut decoder = TinyDecoder {
            model: &self.model,
            cache,
        };
        sample_completions(&mut decoder, logits, max_new, sampling, &[EOS])
    }

    fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        loss.backward()
    }

    /// A copy of the current weights (GRPO starts from them).
    fn reference(&self) -> Result<Box<dyn Policy>> {
        let vars = VarMap::new();
        let model = Vlm::new(
            &self.cfg,
            candle_nn::VarBuilder::from_varmap(&vars, DType::F32, self.device()),
        )?;
        let source = self.vars.data().lock().expect("variables lock");
        for (name, var) in vars.data().lock().expect("variables lock").iter() {
            match source.get(name) {
                Some(v) => var.set(&v.as_tensor().copy()?)?,
                None => candle_core::bail!("reference model: no variable {name} in the policy"),
            }
        }
        drop(source);
        Ok(Box::new(TinyPolicy {
            cfg: self.cfg.clone(),
            vars,
            model,
            tok: self.tok.clone(),
            rounding: self.rounding,
        }))
    }
}
