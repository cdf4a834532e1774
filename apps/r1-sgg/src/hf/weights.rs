//! Safetensors checkpoints in the Hugging Face layout, to and from a model's `VarMap`.
//!
//! The model is built first from a `candle_nn::VarMap` with the Hub's tensor names
//! (`visual.*`, `model.*`, `lm_head.*`), so the names, shapes and dtypes of its variables are
//! known. [`load_weights`] then fills them from a checkpoint, and [`save_pretrained`] writes
//! them back as transformers' `save_pretrained` does.
//!
//! Names: published checkpoints and transformers 5.25's `save_pretrained` use the Hub names;
//! transformers' in-memory names (`model.visual.*`, `model.language_model.*`) are renamed on load
//! by [`hub_name`], which inverts the two `WeightRenaming`s of Qwen2-VL in transformers 5.25's
//! `conversion_mapping.py`.
//!
//! Tied embeddings (`tie_word_embeddings`, Qwen2-VL-2B): the checkpoint has no `lm_head.weight`
//! and the output projection is `model.embed_tokens.weight`. A model that keeps a separate
//! `lm_head.weight` variable gets a copy of the embeddings when the checkpoint lacks it; a save
//! with the flag set leaves `lm_head.weight` out, as transformers does.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::{ChatTemplateFile, HfError, ImageProcessorFile, ModelFiles, Result, WeightFiles};
use super::{CONFIG_FILE, SINGLE_WEIGHTS_FILE, TOKENIZER_FILE, WEIGHTS_INDEX_FILE};

/// The output projection's name.
pub const LM_HEAD: &str = "lm_head.weight";
/// The input embeddings' name (the output projection too when embeddings are tied).
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";

/// transformers 5.25's default `max_shard_size` ("50GB" = 50 * 10^9 bytes), so 2B and 7B models
/// save as one `model.safetensors` unless a smaller size is asked for.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 50_000_000_000;

/// The files, besides config and weights, that a model directory carries and a save copies from
/// its source directory when present (what transformers' tokenizer, processor and generation
/// config write).
pub const COPIED_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
];

/// A checkpoint tensor's Hub name: transformers' in-memory `model.visual.*` -> `visual.*` and
/// `model.language_model.*` -> `model.*`; every other name is kept (Hub names are canonical).
pub fn hub_name(name: &str) -> Cow<'_, str> {
    if let Some(rest) = name.strip_prefix("model.visual.") {
        Cow::Owned(format!("visual.{rest}"))
    } else if let Some(rest) = name.strip_prefix("model.language_model.") {
        Cow::Owned(format!("model.{rest}"))
    } else {
        Cow::Borrowed(name)
    }
}

/// What [`load_weights`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Variables set from a checkpoint tensor.
    pub loaded: usize,
    /// Of those, how many had an in-memory (transformers 5.x) name in the file.
    pub renamed: usize,
    /// Variables whose dtype differs from the file's and were converted.
    pub converted: usize,
    /// Whether `lm_head.weight` was copied from the embeddings (tied checkpoint, untied variable).
    pub lm_head_from_embeddings: bool,
}

/// A memory-mapped safetensors file. Its parsed header ([`MappedFile::tensors`]) borrows the
/// map, so callers keep the two side by side rather than in one self-referential struct.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| HfError::io(path, e))?;
        // SAFETY: the map is read-only and lives while the tensors are copied out of it; a file
        // truncated by another process meanwhile is outside what any mmap reader can guard
        // against (candle's `MmapedSafetensors` makes the same assumption).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| HfError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
        })
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|source| HfError::Safetensors {
            path: self.path.clone(),
            source,
        })
    }
}

fn candle_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

fn file_dtype(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("F32"),
        DType::BF16 => Some("BF16"),
        DType::F16 => Some("F16"),
        DType::F64 => Some("F64"),
        _ => None,
    }
}

/// The variables of a `VarMap`, by name.
fn variables(varmap: &VarMap) -> BTreeMap<String, Var> {
    // A poisoned lock only means another thread panicked while holding it; the map itself is
    // still whole (inserts are single calls), so its contents are used as they are.
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    data.iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect()
}

/// Where one model variable's tensor is: file index, name and dtype in that file.
struct Source {
    file: usize,
    name: String,
    dtype: DType,
}

/// Loads a checkpoint into the model's variables, converting each tensor to its variable's dtype
/// (F32, BF16, F16 or F64 files) and device.
///
/// Every file is memory-mapped and each tensor is copied once, straight to the variable's device.
/// All headers are checked before any variable changes, so a failed load leaves the model as it
/// was. Errors: a model variable no file provides ([`HfError::MissingTensors`], all of them,
/// except `lm_head.weight` when `tie_word_embeddings`), a file tensor the model does not have
/// ([`HfError::UnexpectedTensor`]; an `lm_head.weight` in a tied checkpoint for a model without
/// that variable is skipped, as transformers does), the same tensor twice
/// ([`HfError::DuplicateTensor`]), a shape mismatch ([`HfError::ShapeMismatch`]), an unsupported
/// dtype ([`HfError::UnsupportedDtype`]), and for a sharded checkpoint a tensor whose shard
/// differs from the index's `weight_map` ([`HfError::IndexMismatch`]).
pub fn load_weights(files: &WeightFiles, varmap: &VarMap, tie_word_embeddings: bool) -> Result<LoadReport> {
    let vars = variables(varmap);
    let mapped = files
        .files()
        .iter()
        .map(|p| MappedFile::open(p))
        .collect::<Result<Vec<_>>>()?;
    let headers = mapped
        .iter()
        .map(MappedFile::tensors)
        .collect::<Result<Vec<_>>>()?;

    if let WeightFiles::Sharded {
        index, weight_map, ..
    } = files
    {
        check_index(index, weight_map, &mapped, &headers)?;
    }

    // Pass 1: match every file tensor to a variable and check it, changing nothing.
    let mut sources: BTreeMap<String, Source> = BTreeMap::new();
    let mut report = LoadReport {
        loaded: 0,
        renamed: 0,
        converted: 0,
        lm_head_from_embeddings: false,
    };
    for (file, (st, mf)) in headers.iter().zip(&mapped).enumerate() {
        let mut names = st.names();
        names.sort_unstable();
        for name in names {
            let view = st.tensor(name).map_err(|source| HfError::Safetensors {
                path: mf.path.clone(),
                source,
            })?;
            let hub = hub_name(name);
            let Some(var) = vars.get(hub.as_ref()) else {
                if tie_word_embeddings && hub == LM_HEAD {
                    continue;
                }
                return Err(HfError::UnexpectedTensor {
                    path: mf.path.clone(),
                    name: name.to_owned(),
                });
            };
            let Some(dtype) = candle_dtype(view.dtype()) else {
                return Err(HfError::UnsupportedDtype {
                    path: mf.path.clone(),
                    name: name.to_owned(),
                    dtype: format!("{:?}", view.dtype()),
                });
            };
            if view.shape() != var.dims() {
                return Err(HfError::ShapeMismatch {
                    path: mf.path.clone(),
                    name: name.to_owned(),
                    expected: var.dims().to_vec(),
                    got: view.shape().to_vec(),
                });
            }
            if let Some(first) = sources.get(hub.as_ref()) {
                return Err(HfError::DuplicateTensor {
                    path: mf.path.clone(),
                    first: mapped[first.file].path.clone(),
                    name: hub.into_owned(),
                });
            }
            report.renamed += usize::from(matches!(hub, Cow::Owned(_)));
            report.converted += usize::from(dtype != var.dtype());
            sources.insert(
                hub.into_owned(),
                Source {
                    file,
                    name: name.to_owned(),
                    dtype,
                },
            );
        }
    }
    let tie_head = tie_word_embeddings && vars.contains_key(LM_HEAD) && !sources.contains_key(LM_HEAD);
    let missing: Vec<String> = vars
        .keys()
        .filter(|name| !(sources.contains_key(*name) || (tie_head && *name == LM_HEAD)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(HfError::MissingTensors {
            files: files.files().to_vec(),
            names: missing,
        });
    }

    // Pass 2: copy. Checked above, so only device or allocation failures remain.
    for (hub, source) in &sources {
        let var = &vars[hub];
        let st = &headers[source.file];
        let path = &mapped[source.file].path;
        let context = || format!("{}: tensor {}", path.display(), source.name);
        let view = st.tensor(&source.name).map_err(|source| HfError::Safetensors {
            path: path.clone(),
            source,
        })?;
        let tensor = Tensor::from_raw_buffer(view.data(), source.dtype, view.shape(), var.device())
            .and_then(|t| t.to_dtype(var.dtype()))
            .map_err(|e| HfError::candle(context(), e))?;
        var.set(&tensor).map_err(|e| HfError::candle(context(), e))?;
        report.loaded += 1;
    }
    if tie_head {
        let head = &vars[LM_HEAD];
        let embed = vars.get(EMBED_TOKENS).ok_or_else(|| HfError::MissingTensors {
            files: files.files().to_vec(),
            names: vec![EMBED_TOKENS.to_owned()],
        })?;
        let context = format!("{LM_HEAD} from {EMBED_TOKENS}");
        let tensor = embed
            .as_tensor()
            .to_dtype(head.dtype())
            .map_err(|e| HfError::candle(&context, e))?;
        head.set(&tensor).map_err(|e| HfError::candle(&context, e))?;
        report.lm_head_from_embeddings = true;
    }
    Ok(report)
}

/// Checks that each shard holds exactly the tensors the index assigns to it.
fn check_index(
    index: &Path,
    weight_map: &BTreeMap<String, String>,
    mapped: &[MappedFile],
    headers: &[SafeTensors<'_>],
) -> Result<()> {
    let mismatch = |name: &str, reason: String| HfError::IndexMismatch {
        index: index.to_path_buf(),
        name: name.to_owned(),
        reason,
    };
    let mut found: HashMap<&str, &Path> = HashMap::new();
    for (mf, st) in mapped.iter().zip(headers) {
        let shard = mf.path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        for name in st.names() {
            match weight_map.get(name) {
                Some(listed) if listed == shard => {
                    found.insert(name, &mf.path);
                }
                Some(listed) => {
                    return Err(mismatch(name, format!("listed in {listed} but found in {shard}")))
                }
                None => return Err(mismatch(name, format!("found in {shard} but not listed"))),
            }
        }
    }
    match weight_map
        .iter()
        .find(|(name, _)| !found.contains_key(name.as_str()))
    {
        Some((name, shard)) => Err(mismatch(name, format!("listed in {shard} but not in it"))),
        None => Ok(()),
    }
}

/// How [`save_pretrained`] writes a checkpoint.
#[derive(Debug, Clone)]
pub struct SaveOptions<'a> {
    /// The `config.json` contents (the model's `Config::to_hub_json`).
    pub config: &'a Value,
    /// Leave `lm_head.weight` out (the config ties it to the embeddings).
    pub tie_word_embeddings: bool,
    /// Largest shard in bytes before the weights are split ([`DEFAULT_MAX_SHARD_BYTES`]).
    pub max_shard_bytes: u64,
    /// The directory to copy the tokenizer, chat template and processor files from
    /// ([`COPIED_FILES`]); it may be the destination itself.
    pub source: &'a Path,
    /// More safetensors files to write beside the model's, inside the same atomic swap
    /// (e.g. a trainer's optimizer state: model and state then never disagree on disk).
    pub extra: &'a [ExtraFile<'a>],
}

/// A safetensors file that [`save_pretrained`] writes into the checkpoint directory besides the
/// model's files, streamed tensor by tensor as the weights are.
#[derive(Debug, Clone)]
pub struct ExtraFile<'a> {
    /// Its name in the directory (not one of the model's own file names).
    pub name: &'a str,
    /// Its tensors, by name.
    pub tensors: &'a [(String, Tensor)],
    /// The header's `__metadata__`.
    pub metadata: &'a BTreeMap<String, String>,
}

/// One tensor to write: its Hub name and variable.
struct Entry<'v> {
    name: &'v str,
    tensor: &'v Tensor,
    bytes: u64,
}

/// Writes the model's variables as transformers' `save_pretrained` lays a checkpoint out, into
/// `dir`: `config.json`, the weights in their variables' dtype (bf16 stays bf16) under Hub
/// names, as `model.safetensors` when they fit in `max_shard_bytes`, else as
/// `model-0000k-of-0000n.safetensors` shards plus `model.safetensors.index.json`
/// (`metadata.total_size`, `metadata.total_parameters`, `weight_map`), and the files of
/// [`COPIED_FILES`] found in `opts.source`.
///
/// Shards are filled in name order the way huggingface_hub's `split_state_dict_into_shards`
/// does (a tensor starts a new shard when it would overflow the current one; a tensor larger
/// than the limit gets a shard of its own).
///
/// The checkpoint is written into a temporary sibling of `dir` (`.{name}.tmp-{pid}-{n}`),
/// fsynced, and checked to be a complete model directory ([`ModelFiles::locate`]); only then is
/// an existing `dir` renamed aside (`.{name}.old-{pid}-{n}`), the new one renamed into its
/// place, the parent fsynced, and the old one removed. A failure before the swap leaves `dir` as
/// it was and removes the temporary directory. A crash between the two renames leaves no `dir`
/// but both complete checkpoints beside it: the previous one as `.old-*`, the new one as `.tmp-*`.
pub fn save_pretrained(varmap: &VarMap, dir: &Path, opts: &SaveOptions<'_>) -> Result<()> {
    // The source must hold what a model directory needs besides config and weights; checked
    // first so that the error names the source, not the temporary directory.
    if !opts.source.join(TOKENIZER_FILE).is_file() {
        return Err(HfError::MissingFile {
            dir: opts.source.to_path_buf(),
            what: "tokenizer to copy",
            tried: vec![TOKENIZER_FILE.into()],
        });
    }
    ChatTemplateFile::locate(opts.source)?;
    ImageProcessorFile::locate(opts.source)?;

    let vars = variables(varmap);
    let mut entries: Vec<Entry<'_>> = vars
        .iter()
        .filter(|(name, _)| !(opts.tie_word_embeddings && name.as_str() == LM_HEAD))
        .map(|(name, var)| Entry {
            name,
            tensor: var.as_tensor(),
            bytes: (var.elem_count() * var.dtype().size_in_bytes()) as u64,
        })
        .collect();
    // Larger elements first, as the safetensors crate orders them, so every tensor's data stays
    // aligned to its element size for zero-copy readers.
    entries.sort_by_key(|e| std::cmp::Reverse(e.tensor.dtype().size_in_bytes()));

    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| HfError::invalid(dir, "not a directory name"))?;
    if dir.exists() && !dir.is_dir() {
        return Err(HfError::invalid(dir, "exists and is not a directory"));
    }
    fs::create_dir_all(&parent).map_err(|e| HfError::io(&parent, e))?;
    // Process id and a per-process count: concurrent saves never share a temporary directory.
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let tag = format!("{}-{}", std::process::id(), SAVES.fetch_add(1, Ordering::Relaxed));
    let tmp = parent.join(format!(".{base}.tmp-{tag}"));
    if tmp.exists() {
        // Left by a killed process that had the same id; it was never swapped in.
        fs::remove_dir_all(&tmp).map_err(|e| HfError::io(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| HfError::io(&tmp, e))?;
    match write_checkpoint(&tmp, &entries, opts) {
        Ok(()) => {}
        Err(e) => {
            // The error being reported matters more than a leftover temporary directory.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    swap_in(&tmp, dir, &parent, &parent.join(format!(".{base}.old-{tag}")))
}

/// Writes everything into `tmp` and syncs it.
fn write_checkpoint(tmp: &Path, entries: &[Entry<'_>], opts: &SaveOptions<'_>) -> Result<()> {
    let shards = plan_shards(entries, opts.max_shard_bytes);
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            SINGLE_WEIGHTS_FILE.to_owned()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        write_safetensors(&tmp.join(&file_name), shard, &pt_metadata())?;
        for e in shard {
            weight_map.insert(e.name.to_owned(), Value::String(file_name.clone()));
        }
    }
    if n > 1 {
        let total_size: u64 = entries.iter().map(|e| e.bytes).sum();
        let total_parameters: usize = entries.iter().map(|e| e.tensor.elem_count()).sum();
        let index = json!({
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": weight_map,
        });
        write_json(&tmp.join(WEIGHTS_INDEX_FILE), &index)?;
    }
    write_json(&tmp.join(CONFIG_FILE), opts.config)?;
    for name in COPIED_FILES {
        let from = opts.source.join(name);
        if from.exists() {
            let to = tmp.join(name);
            fs::copy(&from, &to).map_err(|e| HfError::io(&from, e))?;
            File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(|e| HfError::io(&to, e))?;
        }
    }
    for extra in opts.extra {
        let path = tmp.join(extra.name);
        if path.exists() {
            return Err(HfError::invalid(
                &path,
                "an extra file would replace one of the model's",
            ));
        }
        let entries: Vec<Entry<'_>> = extra
            .tensors
            .iter()
            .map(|(name, tensor)| Entry {
                name,
                tensor,
                bytes: (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64,
            })
            .collect();
        let entries: Vec<&Entry<'_>> = entries.iter().collect();
        let metadata = extra
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        write_safetensors(&path, &entries, &metadata)?;
    }
    // The new directory must be loadable before it replaces anything.
    ModelFiles::locate(tmp)?;
    sync_dir(tmp)
}

/// Splits the tensors into shards of at most `max_bytes`, in order; a larger tensor gets a shard
/// of its own, listed before the shard being filled (huggingface_hub's order).
fn plan_shards<'a, 'v>(entries: &'a [Entry<'v>], max_bytes: u64) -> Vec<Vec<&'a Entry<'v>>> {
    let mut shards: Vec<Vec<&Entry<'_>>> = Vec::new();
    let mut current: Vec<&Entry<'_>> = Vec::new();
    let mut size = 0u64;
    for e in entries {
        if e.bytes > max_bytes {
            shards.push(vec![e]);
            continue;
        }
        if size + e.bytes > max_bytes && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(e);
        size += e.bytes;
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

/// Writes one safetensors file tensor by tensor (no copy of the whole shard in memory), with
/// `__metadata__ = {"format": "pt"}` as transformers writes and requires, and fsyncs it.
/// transformers' `__metadata__` of a weights file.
fn pt_metadata() -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("format".into(), json!("pt"));
    m
}

fn write_safetensors(
    path: &Path,
    entries: &[&Entry<'_>],
    metadata: &serde_json::Map<String, Value>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), Value::Object(metadata.clone()));
    let mut offset = 0u64;
    for e in entries {
        let dtype = file_dtype(e.tensor.dtype()).ok_or_else(|| HfError::UnsupportedDtype {
            path: path.to_path_buf(),
            name: e.name.to_owned(),
            dtype: format!("{:?}", e.tensor.dtype()),
        })?;
        header.insert(
            e.name.to_owned(),
            json!({"dtype": dtype, "shape": e.tensor.dims(), "data_offsets": [offset, offset + e.bytes]}),
        );
        offset += e.bytes;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|source| HfError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    // The data starts 8-byte aligned, as the safetensors crate pads it.
    header.resize(header.len().next_multiple_of(8), b' ');

    let file = File::create(path).map_err(|e| HfError::io(path, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let io = |e| HfError::io(path, e);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    for e in entries {
        write_tensor_bytes(&mut out, e.tensor).map_err(|err| err.with_context(path, e.name))?;
    }
    let file = out.into_inner().map_err(|e| HfError::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| HfError::io(path, e))
}

/// An error of [`write_tensor_bytes`], before the file and tensor are attached.
enum WriteError {
    Io(std::io::Error),
    Candle(candle_core::Error),
}

impl WriteError {
    fn with_context(self, path: &Path, name: &str) -> HfError {
        match self {
            Self::Io(e) => HfError::io(path, e),
            Self::Candle(e) => HfError::candle(format!("{}: tensor {name}", path.display()), e),
        }
    }
}

/// Appends a tensor's elements, little-endian, in row-major order.
fn write_tensor_bytes(out: &mut impl Write, tensor: &Tensor) -> std::result::Result<(), WriteError> {
    let flat = tensor
        .flatten_all()
        .and_then(|t| t.to_device(&Device::Cpu))
        .map_err(WriteError::Candle)?;
    fn put<T: candle_core::WithDType, const N: usize>(
        out: &mut impl Write,
        flat: &Tensor,
        bytes: impl Fn(T) -> [u8; N],
    ) -> std::result::Result<(), WriteError> {
        let values = flat.to_vec1::<T>().map_err(WriteError::Candle)?;
        let mut buf = Vec::with_capacity((1 << 16) * N);
        for chunk in values.chunks(1 << 16) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|&v| bytes(v)));
            out.write_all(&buf).map_err(WriteError::Io)?;
        }
        Ok(())
    }
    match flat.dtype() {
        DType::F32 => put(out, &flat, f32::to_le_bytes),
        DType::F64 => put(out, &flat, f64::to_le_bytes),
        DType::BF16 => put(out, &flat, |v: half::bf16| v.to_le_bytes()),
        DType::F16 => put(out, &flat, |v: half::f16| v.to_le_bytes()),
        // `write_safetensors` rejects other dtypes before writing anything.
        other => Err(WriteError::Candle(candle_core::Error::UnsupportedDTypeForOp(
            other,
            "save_pretrained",
        ))),
    }
}

/// Writes `value` as transformers writes its JSON files (2-space indent, trailing newline) and
/// fsyncs it.
fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| HfError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    let mut file = File::create(path).map_err(|e| HfError::io(path, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| HfError::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| HfError::io(dir, e))
}

/// Puts the complete `tmp` in place of `dir`, keeping the old `dir` (as `old`) until then.
fn swap_in(tmp: &Path, dir: &Path, parent: &Path, old: &Path) -> Result<()> {
    let had_old = dir.exists();
    if had_old {
        if old.exists() {
            fs::remove_dir_all(old).map_err(|e| HfError::io(old, e))?;
        }
        fs::rename(dir, old).map_err(|e| HfError::io(dir, e))?;
    }
    if let Err(e) = fs::rename(tmp, dir) {
        // Put the previous checkpoint back; the new one stays in `tmp` for inspection.
        if had_old {
            let _ = fs::rename(old, dir);
        }
        return Err(HfError::io(dir, e));
    }
    sync_dir(parent)?;
    if had_old {
        fs::remove_dir_all(old).map_err(|e| HfError::io(old, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::read_json;
    use candle_nn::Init;

    /// A model directory's non-weight files, enough for [`ModelFiles::locate`].
    pub(crate) fn write_aux_files(dir: &Path) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("tokenizer.json"), "{}").unwrap();
        fs::write(dir.join("chat_template.jinja"), "{{ messages }}").unwrap();
        fs::write(dir.join("preprocessor_config.json"), "{}").unwrap();
    }

    /// A VarMap with Hub names: three vision tensors, embeddings, one layer weight, lm_head.
    fn model(dtype: DType, with_head: bool) -> VarMap {
        let varmap = VarMap::new();
        let mut shapes = vec![
            ("visual.patch_embed.proj.weight", vec![8, 3, 2, 2, 2]),
            ("visual.blocks.0.norm1.weight", vec![8]),
            ("visual.blocks.0.norm1.bias", vec![8]),
            (EMBED_TOKENS, vec![16, 4]),
            ("model.layers.0.mlp.up_proj.weight", vec![6, 4]),
        ];
        if with_head {
            shapes.push((LM_HEAD, vec![16, 4]));
        }
        for (name, shape) in shapes {
            let init = Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            };
            varmap.get(shape, name, init, dtype, &Device::Cpu).unwrap();
        }
        varmap
    }

    /// The same names and shapes, zeroed.
    fn zeroed_like(varmap: &VarMap) -> VarMap {
        let fresh = VarMap::new();
        for (name, var) in variables(varmap) {
            fresh
                .get(var.shape(), &name, Init::Const(0.0), var.dtype(), &Device::Cpu)
                .unwrap();
        }
        fresh
    }

    /// Every variable's bits, by name.
    fn bits(varmap: &VarMap) -> BTreeMap<String, Vec<u8>> {
        variables(varmap)
            .into_iter()
            .map(|(name, var)| {
                let mut bytes = Vec::new();
                write_tensor_bytes(&mut bytes, var.as_tensor()).ok().unwrap();
                (name, bytes)
            })
            .collect()
    }

    fn save(varmap: &VarMap, dir: &Path, source: &Path, tied: bool, max_shard_bytes: u64) -> Result<()> {
        let config = json!({"model_type": "qwen2_vl", "tie_word_embeddings": tied});
        let opts = SaveOptions {
            config: &config,
            tie_word_embeddings: tied,
            max_shard_bytes,
            source,
            extra: &[],
        };
        save_pretrained(varmap, dir, &opts)
    }

    /// Writes `tensors` under their given names as one safetensors file.
    fn write_file(path: &Path, tensors: &[(&str, Tensor)]) {
        let data: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
        safetensors::serialize_to_file(data, None, path).unwrap();
    }

    fn tensor(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn round_trip_is_bit_exact_in_f32_and_bf16() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("source");
        write_aux_files(&source);
        for dtype in [DType::F32, DType::BF16] {
            let original = model(dtype, true);
            let dir = tmp.path().join(format!("ckpt-{dtype:?}"));
            save(&original, &dir, &source, false, DEFAULT_MAX_SHARD_BYTES).unwrap();
            let files = ModelFiles::locate(&dir).unwrap();
            assert!(matches!(files.weights, WeightFiles::Single(_)));
            let st = fs::read(dir.join(SINGLE_WEIGHTS_FILE)).unwrap();
            let st = SafeTensors::deserialize(&st).unwrap();
            let expected = if dtype == DType::F32 {
                Dtype::F32
            } else {
                Dtype::BF16
            };
            assert!(
                st.tensors().iter().all(|(_, v)| v.dtype() == expected),
                "{dtype:?} kept"
            );
            let loaded = zeroed_like(&original);
            let report = load_weights(&files.weights, &loaded, false).unwrap();
            assert_eq!(report.loaded, 6);
            assert_eq!((report.renamed, report.converted), (0, 0));
            assert_eq!(bits(&loaded), bits(&original), "{dtype:?}");
            assert_eq!(files.config_json().unwrap()["model_type"], "qwen2_vl");
            for name in [
                "tokenizer.json",
                "chat_template.jinja",
                "preprocessor_config.json",
            ] {
                assert_eq!(
                    fs::read(dir.join(name)).unwrap(),
                    fs::read(source.join(name)).unwrap()
                );
            }
        }
    }

    #[test]
    fn converts_file_dtype_to_the_variables() {
        let tmp = tempfile::tempdir().unwrap();
        write_aux_files(tmp.path());
        let original = model(DType::BF16, true);
        save(
            &original,
            &tmp.path().join("bf16"),
            tmp.path(),
            false,
            DEFAULT_MAX_SHARD_BYTES,
        )
        .unwrap();
        let files = ModelFiles::locate(tmp.path().join("bf16")).unwrap();
        let f32_model = VarMap::new();
        for (name, var) in variables(&original) {
            f32_model
                .get(var.shape(), &name, Init::Const(0.0), DType::F32, &Device::Cpu)
                .unwrap();
        }
        let report = load_weights(&files.weights, &f32_model, false).unwrap();
        assert_eq!(report.converted, 6);
        // bf16 -> f32 is exact, so converting back gives the saved bits.
        let back = VarMap::new();
        for (name, var) in variables(&f32_model) {
            back.get(var.shape(), &name, Init::Const(0.0), DType::BF16, &Device::Cpu)
                .unwrap();
            back.data().lock().unwrap()[&name]
                .set(&var.to_dtype(DType::BF16).unwrap())
                .unwrap();
        }
        assert_eq!(bits(&back), bits(&original));
    }

    #[test]
    fn tied_save_leaves_out_lm_head_and_load_fills_it() {
        let tmp = tempfile::tempdir().unwrap();
        write_aux_files(tmp.path());
        let original = model(DType::F32, true);
        let dir = tmp.path().join("tied");
        save(&original, &dir, tmp.path(), true, DEFAULT_MAX_SHARD_BYTES).unwrap();
        let st = fs::read(dir.join(SINGLE_WEIGHTS_FILE)).unwrap();
        let names = SafeTensors::deserialize(&st).unwrap().names().len();
        assert_eq!(names, 5, "no lm_head.weight");
        let files = ModelFiles::locate(&dir).unwrap();

        // A model with its own lm_head variable gets the embeddings.
        let with_head = zeroed_like(&original);
        let report = load_weights(&files.weights, &with_head, true).unwrap();
        assert!(report.lm_head_from_embeddings);
        let b = bits(&with_head);
        assert_eq!(b[LM_HEAD], b[EMBED_TOKENS]);
        // Untied, the same checkpoint lacks lm_head.weight.
        match load_weights(&files.weights, &zeroed_like(&original), false) {
            Err(HfError::MissingTensors { names, .. }) => assert_eq!(names, [LM_HEAD]),
            other => panic!("{other:?}"),
        }
        // A model without the variable loads it as is.
        let headless = zeroed_like(&model(DType::F32, false));
        assert!(
            !load_weights(&files.weights, &headless, true)
                .unwrap()
                .lm_head_from_embeddings
        );
        // A tied checkpoint that still stores lm_head.weight loads into a headless model.
        let untied_dir = tmp.path().join("untied");
        save(&original, &untied_dir, tmp.path(), false, DEFAULT_MAX_SHARD_BYTES).unwrap();
        let untied = WeightFiles::locate(&untied_dir).unwrap();
        assert_eq!(load_weights(&untied, &headless, true).unwrap().loaded, 5);
    }

    #[test]
    fn shards_at_the_size_limit() {
        let tmp = tempfile::tempdir().unwrap();
        write_aux_files(tmp.path());
        let varmap = VarMap::new();
        // Sorted: a (40 B), b (40 B), c (200 B), d (8 B), e (40 B).
        for (name, n) in [
            ("visual.a", 10),
            ("visual.b", 10),
            ("visual.c", 50),
            ("visual.d", 2),
            ("visual.e", 10),
        ] {
            varmap
                .get(
                    n,
                    name,
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
        }
        // 80 bytes: a+b exactly fill a shard; c is oversized, so it gets a shard of its own at
        // once, ahead of the one being filled (huggingface_hub's order); d+e share the last.
        let dir = tmp.path().join("sharded");
        save(&varmap, &dir, tmp.path(), false, 80).unwrap();
        let index = read_json(&dir.join(WEIGHTS_INDEX_FILE)).unwrap();
        assert_eq!(index["metadata"]["total_size"], 328);
        assert_eq!(index["metadata"]["total_parameters"], 82);
        let shard = |k: u32| format!("model-{k:05}-of-00003.safetensors");
        let expected = json!({
            "visual.a": shard(2), "visual.b": shard(2), "visual.c": shard(1),
            "visual.d": shard(3), "visual.e": shard(3),
        });
        assert_eq!(index["weight_map"], expected);
        assert!(!dir.join(SINGLE_WEIGHTS_FILE).exists());
        let files = ModelFiles::locate(&dir).unwrap();
        assert_eq!(files.weights.files().len(), 3);
        let loaded = zeroed_like(&varmap);
        assert_eq!(load_weights(&files.weights, &loaded, false).unwrap().loaded, 5);
        assert_eq!(bits(&loaded), bits(&varmap));

        // One byte less: [a], [c], [b, d], [e]; everything fitting: one file.
        save(&varmap, &dir, tmp.path(), false, 79).unwrap();
        let index = read_json(&dir.join(WEIGHTS_INDEX_FILE)).unwrap();
        assert_eq!(
            index["weight_map"]["visual.b"],
            "model-00003-of-00004.safetensors"
        );
        assert_eq!(
            index["weight_map"]["visual.d"],
            "model-00003-of-00004.safetensors"
        );
        save(&varmap, &dir, tmp.path(), false, 328).unwrap();
        assert!(dir.join(SINGLE_WEIGHTS_FILE).exists());
        assert!(
            !dir.join(WEIGHTS_INDEX_FILE).exists(),
            "the old checkpoint's index is gone"
        );
    }

    #[test]
    fn loads_transformers_5_in_memory_names() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SINGLE_WEIGHTS_FILE);
        let (v, e, h) = (tensor(&[8]), tensor(&[16, 4]), tensor(&[16, 4]));
        write_file(
            &path,
            &[
                ("model.visual.blocks.0.norm1.weight", v.clone()),
                ("model.language_model.embed_tokens.weight", e.clone()),
                (LM_HEAD, h.clone()),
            ],
        );
        let varmap = VarMap::new();
        for (name, shape) in [
            ("visual.blocks.0.norm1.weight", vec![8]),
            (EMBED_TOKENS, vec![16, 4]),
            (LM_HEAD, vec![16, 4]),
        ] {
            varmap
                .get(shape, name, Init::Const(0.0), DType::F32, &Device::Cpu)
                .unwrap();
        }
        let report = load_weights(&WeightFiles::Single(path), &varmap, false).unwrap();
        assert_eq!((report.loaded, report.renamed), (3, 2));
        let vars = variables(&varmap);
        for (name, t) in [
            ("visual.blocks.0.norm1.weight", v),
            (EMBED_TOKENS, e),
            (LM_HEAD, h),
        ] {
            let diff = (vars[name].as_tensor() - t)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}");
        }
        assert_eq!(
            hub_name("model.visual.merger.mlp.0.weight"),
            "visual.merger.mlp.0.weight"
        );
        assert_eq!(hub_name("model.language_model.norm.weight"), "model.norm.weight");
        assert_eq!(
            hub_name("model.layers.0.mlp.up_proj.weight"),
            "model.layers.0.mlp.up_proj.weight"
        );
    }

    /// A one-variable model (`visual.a`, shape [2, 3], f32) and a file with `tensors`.
    fn load_one(dir: &Path, tensors: &[(&str, Tensor)]) -> Result<LoadReport> {
        let path = dir.join(SINGLE_WEIGHTS_FILE);
        write_file(&path, tensors);
        let varmap = VarMap::new();
        varmap
            .get((2, 3), "visual.a", Init::Const(0.0), DType::F32, &Device::Cpu)
            .unwrap();
        load_weights(&WeightFiles::Single(path), &varmap, false)
    }

    #[test]
    fn load_errors_name_the_file_and_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join(SINGLE_WEIGHTS_FILE);
        match load_one(tmp.path(), &[("visual.b", tensor(&[2, 3]))]) {
            Err(HfError::UnexpectedTensor { path, name }) => {
                assert_eq!((path, name.as_str()), (file.clone(), "visual.b"))
            }
            other => panic!("{other:?}"),
        }
        match load_one(tmp.path(), &[("visual.a", tensor(&[3, 2]))]) {
            Err(e @ HfError::ShapeMismatch { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("visual.a") && text.contains("[3, 2]") && text.contains("[2, 3]"),
                    "{text}"
                );
                assert!(text.contains(&file.display().to_string()), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let ints = Tensor::zeros((2, 3), DType::I64, &Device::Cpu).unwrap();
        match load_one(tmp.path(), &[("visual.a", ints)]) {
            Err(HfError::UnsupportedDtype { name, dtype, .. }) => {
                assert_eq!((name.as_str(), dtype.as_str()), ("visual.a", "I64"))
            }
            other => panic!("{other:?}"),
        }
        match load_one(
            tmp.path(),
            &[("visual.a", tensor(&[2, 3])), ("model.visual.a", tensor(&[2, 3]))],
        ) {
            Err(HfError::DuplicateTensor { name, .. }) => assert_eq!(name, "visual.a"),
            other => panic!("{other:?}"),
        }
        match load_one(tmp.path(), &[]) {
            Err(e @ HfError::MissingTensors { .. }) => assert!(e.to_string().contains("visual.a"), "{e}"),
            other => panic!("{other:?}"),
        }
        fs::write(&file, b"not a safetensors file").unwrap();
        let varmap = VarMap::new();
        match load_weights(&WeightFiles::Single(file.clone()), &varmap, false) {
            Err(HfError::Safetensors { path, .. }) => assert_eq!(path, file),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_load_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(SINGLE_WEIGHTS_FILE);
        // `visual.a` is fine and sorts first; `visual.b` has the wrong shape.
        write_file(&path, &[("visual.a", tensor(&[2])), ("visual.b", tensor(&[5]))]);
        let varmap = VarMap::new();
        varmap
            .get(2, "visual.a", Init::Const(7.0), DType::F32, &Device::Cpu)
            .unwrap();
        varmap
            .get(4, "visual.b", Init::Const(7.0), DType::F32, &Device::Cpu)
            .unwrap();
        assert!(matches!(
            load_weights(&WeightFiles::Single(path), &varmap, false),
            Err(HfError::ShapeMismatch { .. })
        ));
        assert_eq!(
            variables(&varmap)["visual.a"].to_vec1::<f32>().unwrap(),
            [7.0, 7.0]
        );
    }

    /// A sharded checkpoint of `visual.a`, `visual.b` saved at an 8-byte shard limit.
    fn sharded(tmp: &Path) -> (PathBuf, VarMap) {
        write_aux_files(tmp);
        let varmap = VarMap::new();
        for name in ["visual.a", "visual.b"] {
            varmap
                .get(
                    2,
                    name,
                    Init::Randn {
                        mean: 0.0,
                        stdev: 1.0,
                    },
                    DType::F32,
                    &Device::Cpu,
                )
                .unwrap();
        }
        let dir = tmp.join("sharded");
        save(&varmap, &dir, tmp, false, 8).unwrap();
        (dir, varmap)
    }

    #[test]
    fn index_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, varmap) = sharded(tmp.path());
        let index_path = dir.join(WEIGHTS_INDEX_FILE);
        let index = fs::read_to_string(&index_path).unwrap();

        // The index names a shard that is not there.
        fs::write(
            &index_path,
            index.replace("model-00002-of-00002", "model-00002-of-00003"),
        )
        .unwrap();
        match ModelFiles::locate(&dir) {
            Err(HfError::MissingShard { shard, .. }) => assert_eq!(shard, "model-00002-of-00003.safetensors"),
            other => panic!("{other:?}"),
        }
        // The index puts a tensor in the wrong shard.
        let swapped = index.replace(
            r#""visual.b": "model-00002-of-00002.safetensors""#,
            r#""visual.b": "model-00001-of-00002.safetensors""#,
        );
        assert_ne!(swapped, index);
        let swapped = swapped.replace(
            r#""visual.a": "model-00001-of-00002.safetensors""#,
            r#""visual.a": "model-00002-of-00002.safetensors""#,
        );
        fs::write(&index_path, swapped).unwrap();
        let files = WeightFiles::locate(&dir).unwrap();
        match load_weights(&files, &zeroed_like(&varmap), false) {
            Err(e @ HfError::IndexMismatch { .. }) => assert!(e.to_string().contains("visual.a"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Not JSON / no weight_map.
        fs::write(&index_path, "{").unwrap();
        assert!(matches!(WeightFiles::locate(&dir), Err(HfError::Json { .. })));
        fs::write(&index_path, "{\"metadata\": {}}").unwrap();
        assert!(matches!(WeightFiles::locate(&dir), Err(HfError::Invalid { .. })));
        // A shard name that leaves the directory.
        fs::write(
            &index_path,
            r#"{"weight_map": {"visual.a": "../sharded/model-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        assert!(matches!(
            WeightFiles::locate(&dir),
            Err(HfError::MissingShard { .. })
        ));
        // No weights at all.
        fs::remove_file(&index_path).unwrap();
        match WeightFiles::locate(&dir) {
            Err(HfError::MissingFile { what, tried, .. }) => {
                assert_eq!((what, tried.len()), ("weights", 2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_save_keeps_the_previous_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, varmap) = sharded(tmp.path());
        let snapshot = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
            fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap())
                .map(|e| (e.file_name().into_string().unwrap(), fs::read(e.path()).unwrap()))
                .collect()
        };
        let before = snapshot(&dir);
        let other = model(DType::F32, true);

        // A copy fails after the weights are written: a directory where a file is expected.
        fs::create_dir(tmp.path().join("generation_config.json")).unwrap();
        match save(&other, &dir, tmp.path(), false, DEFAULT_MAX_SHARD_BYTES) {
            Err(HfError::Io { path, .. }) => assert!(path.ends_with("generation_config.json"), "{path:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(snapshot(&dir), before);
        fs::remove_dir(tmp.path().join("generation_config.json")).unwrap();

        // The source lacks what a model directory needs.
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(matches!(
            save(&other, &dir, &empty, false, 8),
            Err(HfError::MissingFile { .. })
        ));
        assert_eq!(snapshot(&dir), before);

        // Nothing temporary is left beside it.
        let leftovers: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // And it still loads.
        let files = ModelFiles::locate(&dir).unwrap();
        assert_eq!(
            load_weights(&files.weights, &zeroed_like(&varmap), false)
                .unwrap()
                .loaded,
            2
        );
    }
}
