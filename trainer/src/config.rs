//! Typed run configuration, read from YAML and validated once at start.
//!
//! Every field has its default written here, in one place. Unknown fields are rejected, and
//! every error names the file and the field at fault.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("config {file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("config {file}: field `{field}`: {message}")]
    Invalid {
        file: PathBuf,
        field: &'static str,
        message: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub sparsity: SparsityConfig,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub parallel: ParallelConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// Llama-style decoder shape.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    pub max_seq_len: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    #[serde(default = "default_init_std")]
    pub init_std: f64,
}

impl ModelConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Parameter count (embeddings counted once when tied).
    pub fn num_params(&self) -> usize {
        let d = self.hidden_size;
        let kv = self.kv_heads() * self.head_dim();
        let attn = d * d * 2 + 2 * d * kv;
        let ffn = 3 * d * self.intermediate_size;
        let layer = attn + ffn + 2 * d;
        let emb = self.vocab_size * d;
        let head = if self.tie_embeddings { 0 } else { emb };
        emb + head + self.num_layers * layer + d
    }
    /// Training FLOPs per token: 6 * params + attention (12 * L * D * T), the usual MFU
    /// convention (embedding lookups included in params, as anchors.md measures).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        6.0 * self.num_params() as f64
            + 12.0 * (self.num_layers * self.hidden_size * seq_len) as f64
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere.
    Fp32,
    /// bf16 autocast over fp32 master weights (GPU only; CPU runs fall back to fp32).
    Bf16,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Activation recompute: what the training forward keeps for the backward.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String", into = "String")]
pub enum Recompute {
    /// Every intermediate the backward reads is kept.
    #[default]
    None,
    /// Each layer's FFN keeps only its input; the backward runs it again.
    Ffn,
    /// Each decoder block keeps only its inputs; the backward runs it again.
    Full,
}

impl Recompute {
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Ffn => "ffn",
            Recompute::Full => "full",
        }
    }
}

// Through a string so that a bad value names the field even where serde's path is lost
// (`--set` overrides go through an untyped tree).
impl TryFrom<String> for Recompute {
    type Error = String;
    fn try_from(s: String) -> Result<Recompute, String> {
        match s.as_str() {
            "none" => Ok(Recompute::None),
            "ffn" => Ok(Recompute::Ffn),
            "full" => Ok(Recompute::Full),
            _ => Err(format!(
                "train.recompute: `{s}` is not one of none, ffn, full"
            )),
        }
    }
}

impl From<Recompute> for String {
    fn from(r: Recompute) -> String {
        r.name().to_string()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Global batch in sequences (over all data-parallel ranks and accumulation steps).
    pub batch_size: usize,
    /// Sequences per rank per forward; accumulation = batch / (micro * data ranks).
    pub micro_batch_size: usize,
    /// Tokens per sequence (<= model.max_seq_len).
    pub seq_len: usize,
    pub lr: f64,
    /// Final LR as a fraction of `lr` at the end of the cosine.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    pub precision: Precision,
    pub device: DeviceChoice,
    pub log_every: usize,
    /// Evaluate on the validation set every N steps (0: never).
    pub eval_every: usize,
    pub eval_batches: usize,
    /// Consecutive non-finite steps after which the run stops.
    pub max_skipped_steps: usize,
    /// Activation recompute: `none`, `ffn` or `full` (see [`Recompute`]); losses and
    /// gradients are the same whichever is chosen.
    pub recompute: Recompute,
    /// On CUDA, capture a micro-batch's forward and backward once as a CUDA graph and replay
    /// it for the others (one launch instead of thousands; the same losses and gradients).
    /// Captured again when a layer changes path, a hybrid pool grows or the model is repacked.
    pub cuda_graph: bool,
    /// Where runs write logs, TensorBoard files and checkpoints.
    pub out_dir: PathBuf,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 42,
            max_steps: 1000,
            batch_size: 8,
            micro_batch_size: 8,
            seq_len: 128,
            lr: 1e-3,
            min_lr_ratio: 0.0,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            precision: Precision::Bf16,
            device: DeviceChoice::Auto,
            log_every: 10,
            eval_every: 0,
            eval_batches: 8,
            max_skipped_steps: 10,
            recompute: Recompute::None,
            cuda_graph: false,
            out_dir: PathBuf::from("runs/default"),
        }
    }
}

/// The L1 penalty on the FFN hidden activations and the sparse-path scheduler.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SparsityConfig {
    /// Target lambda. loss = CE + lambda * L1, L1 = mean over layers of
    /// (1/N_global) * sum over tokens and hidden units of |h|.
    pub l1_coeff: f64,
    /// lambda is 0 before this optimizer step...
    pub l1_start_step: usize,
    /// ...and ramps linearly to `l1_coeff` at this step (== start: constant from start).
    pub l1_end_step: usize,
    /// Per-layer weights of the L1 term, one per layer (empty: every layer 1). The term is
    /// then the mean over layers of `w_l L1_l`: lambda heavier or lighter on some layers.
    pub l1_layer_weights: Vec<f64>,
    /// FFN path: `dense`, `twell`, `hybrid`, or `auto` (per layer, from measured non-zeros).
    pub ffn_path: String,
    /// In `auto`, a layer runs sparse when its mean active units per token is below this.
    pub l0_cutoff: f64,
    /// In `auto`, the per-layer decision is re-taken every this many optimizer steps.
    pub switch_period: usize,
    /// A unit is dead after not firing for this many tokens (global).
    pub tokens_until_dead: u64,
    /// Redraw the gate rows of dead units at each log interval (see `dead_units`).
    pub reinit_dead: bool,
    /// Every this many optimizer steps, physically remove dead units (0: never; see `repack`).
    pub repack_every: usize,
}

impl Default for SparsityConfig {
    fn default() -> Self {
        SparsityConfig {
            l1_coeff: 0.0,
            l1_start_step: 0,
            l1_end_step: 0,
            l1_layer_weights: Vec::new(),
            ffn_path: "dense".into(),
            l0_cutoff: 50.0,
            switch_period: 20,
            tokens_until_dead: 1 << 20,
            reinit_dead: false,
            repack_every: 0,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Shard directory (or one shard file) of the training set, relative to the config
    /// file's directory's parent when relative (the repository root for `configs/*.yaml`).
    pub train: Option<PathBuf>,
    pub val: Option<PathBuf>,
    /// Uniform random tokens instead of a corpus (throughput benchmarks only).
    pub synthetic: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Data-parallel ranks; 0 (the default) uses every rank of the job.
    pub data: usize,
    pub tensor: usize,
    pub zero1: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig {
            data: 0,
            tensor: 1,
            zero1: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every N optimizer steps (0: only at the end and on a stop signal).
    pub every: usize,
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: 0,
            keep_last: 3,
        }
    }
}

/// Sets `a.b=value` in a parsed config tree.
fn apply_override(tree: &mut serde_json::Value, item: &str) -> Result<(), String> {
    let (key, value) = item.split_once('=').ok_or("expected KEY=VALUE")?;
    let value: serde_json::Value = serde_saphyr::from_str(value).map_err(|e| e.to_string())?;
    let mut node = tree;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let map = node
            .as_object_mut()
            .ok_or_else(|| format!("`{key}` is not a section"))?;
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return Ok(());
        }
        node = map
            .entry(part.to_string())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
    Err("empty key".into())
}

/// `x > 0`, false for NaN (written as a function so the NaN case reads plainly).
fn is_positive(x: f64) -> bool {
    x > 0.0
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_init_std() -> f64 {
    0.02
}

impl Config {
    /// Reads, parses and validates a config file. Relative data paths are resolved against
    /// the repository root guess: the config file's parent's parent for `configs/x.yaml`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with_overrides(path, &[])
    }

    /// Like [`Config::load`], then applies `section.field=value` overrides (the value parsed
    /// as YAML) before validation: `--set train.batch_size=16`.
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Config::parse_with_overrides(&text, path, overrides)?;
        let base = path
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().and_then(|d| d.parent()).map(Path::to_path_buf))
            .unwrap_or_default();
        for p in [&mut cfg.data.train, &mut cfg.data.val]
            .into_iter()
            .flatten()
        {
            if p.is_relative() && !p.exists() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// This config with `section.field=value` overrides applied and validated again (a
    /// checkpoint's stored config, adjusted for a bench); `origin` names it in errors.
    pub fn with_overrides(
        &self,
        overrides: &[String],
        origin: &Path,
    ) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            file: origin.to_path_buf(),
            message,
        };
        let mut tree = serde_json::to_value(self).map_err(|e| parse_err(e.to_string()))?;
        for o in overrides {
            apply_override(&mut tree, o).map_err(|m| parse_err(format!("--set {o}: {m}")))?;
        }
        let cfg: Config = serde_json::from_value(tree).map_err(|e| parse_err(e.to_string()))?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Parses and validates YAML text; `file` is used in error messages only.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        Config::parse_with_overrides(text, file, &[])
    }

    fn parse_with_overrides(
        text: &str,
        file: &Path,
        overrides: &[String],
    ) -> Result<Config, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            file: file.to_path_buf(),
            message,
        };
        let cfg: Config = if overrides.is_empty() {
            serde_saphyr::from_str(text).map_err(|e| parse_err(e.to_string()))?
        } else {
            let mut tree: serde_json::Value =
                serde_saphyr::from_str(text).map_err(|e| parse_err(e.to_string()))?;
            for o in overrides {
                apply_override(&mut tree, o).map_err(|m| parse_err(format!("--set {o}: {m}")))?;
            }
            serde_json::from_value(tree).map_err(|e| parse_err(e.to_string()))?
        };
        cfg.validate(file)?;
        Ok(cfg)
    }

    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |field: &'static str, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            field,
            message,
        };
        let m = &self.model;
        let positive = [
            ("model.vocab_size", m.vocab_size),
            ("model.hidden_size", m.hidden_size),
            ("model.intermediate_size", m.intermediate_size),
            ("model.num_layers", m.num_layers),
            ("model.num_heads", m.num_heads),
            ("model.max_seq_len", m.max_seq_len),
            ("train.batch_size", self.train.batch_size),
            ("train.micro_batch_size", self.train.micro_batch_size),
            ("train.seq_len", self.train.seq_len),
            ("train.max_steps", self.train.max_steps),
            ("train.log_every", self.train.log_every),
            ("parallel.tensor", self.parallel.tensor),
            ("checkpoint.keep_last", self.checkpoint.keep_last),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(bad(field, "must be > 0".into()));
            }
        }
        if !m.hidden_size.is_multiple_of(m.num_heads) {
            return Err(bad(
                "model.hidden_size",
                format!(
                    "{} is not divisible by model.num_heads = {}",
                    m.hidden_size, m.num_heads
                ),
            ));
        }
        if !m.head_dim().is_multiple_of(2) {
            return Err(bad(
                "model.num_heads",
                "head dimension must be even for RoPE".into(),
            ));
        }
        if !m.num_heads.is_multiple_of(m.kv_heads()) {
            return Err(bad(
                "model.num_kv_heads",
                format!(
                    "{} does not divide model.num_heads = {}",
                    m.kv_heads(),
                    m.num_heads
                ),
            ));
        }
        if !is_positive(m.rope_theta) {
            return Err(bad("model.rope_theta", "must be > 0".into()));
        }
        if !is_positive(m.rms_norm_eps) {
            return Err(bad("model.rms_norm_eps", "must be > 0".into()));
        }
        if !is_positive(m.init_std) {
            return Err(bad("model.init_std", "must be > 0".into()));
        }
        let t = &self.train;
        if t.seq_len > m.max_seq_len {
            return Err(bad(
                "train.seq_len",
                format!(
                    "{} exceeds model.max_seq_len = {}",
                    t.seq_len, m.max_seq_len
                ),
            ));
        }
        let per_step = t.micro_batch_size * self.parallel.data.max(1);
        if !t.batch_size.is_multiple_of(per_step) {
            return Err(bad(
                "train.batch_size",
                format!(
                    "{} is not a multiple of train.micro_batch_size ({}) x parallel.data ({})",
                    t.batch_size, t.micro_batch_size, self.parallel.data
                ),
            ));
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(bad(
                "train.lr",
                format!("{} must be a positive number", t.lr),
            ));
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(bad("train.min_lr_ratio", "must be in [0, 1]".into()));
        }
        if !(0.0..1.0).contains(&t.beta1) {
            return Err(bad("train.beta1", "must be in [0, 1)".into()));
        }
        if !(0.0..1.0).contains(&t.beta2) {
            return Err(bad("train.beta2", "must be in [0, 1)".into()));
        }
        if !is_positive(t.eps) {
            return Err(bad("train.eps", "must be > 0".into()));
        }
        if t.weight_decay < 0.0 {
            return Err(bad("train.weight_decay", "must be >= 0".into()));
        }
        if t.grad_clip < 0.0 {
            return Err(bad("train.grad_clip", "must be >= 0 (0 disables)".into()));
        }
        if t.max_skipped_steps == 0 {
            return Err(bad("train.max_skipped_steps", "must be > 0".into()));
        }
        if t.cuda_graph && t.device == DeviceChoice::Cpu {
            return Err(bad(
                "train.cuda_graph",
                "CUDA graphs need train.device `cuda` (or `auto` on a GPU machine): set it false for CPU runs".into(),
            ));
        }
        if t.cuda_graph && self.parallel.tensor > 1 {
            return Err(bad(
                "train.cuda_graph",
                format!(
                    "is not supported with parallel.tensor = {} (its collectives run inside the micro-batch): set it false",
                    self.parallel.tensor
                ),
            ));
        }
        let s = &self.sparsity;
        if !(s.l1_coeff >= 0.0 && s.l1_coeff.is_finite()) {
            return Err(bad(
                "sparsity.l1_coeff",
                "must be a finite number >= 0".into(),
            ));
        }
        if s.l1_end_step < s.l1_start_step {
            return Err(bad(
                "sparsity.l1_end_step",
                format!(
                    "{} is before sparsity.l1_start_step = {}",
                    s.l1_end_step, s.l1_start_step
                ),
            ));
        }
        if !s.l1_layer_weights.is_empty() && s.l1_layer_weights.len() != self.model.num_layers {
            return Err(bad(
                "sparsity.l1_layer_weights",
                format!(
                    "{} weights for model.num_layers = {}: give one per layer, or none",
                    s.l1_layer_weights.len(),
                    self.model.num_layers
                ),
            ));
        }
        if let Some((l, w)) = s
            .l1_layer_weights
            .iter()
            .enumerate()
            .find(|(_, w)| !(**w >= 0.0 && w.is_finite()))
        {
            return Err(bad(
                "sparsity.l1_layer_weights",
                format!("layer {l}: {w} must be a finite number >= 0"),
            ));
        }
        if s.ffn_path != "auto" && s.ffn_path.parse::<sparse_kernels::FfnPath>().is_err() {
            return Err(bad(
                "sparsity.ffn_path",
                format!("`{}`: expected dense, twell, hybrid or auto", s.ffn_path),
            ));
        }
        if s.switch_period == 0 {
            return Err(bad("sparsity.switch_period", "must be > 0".into()));
        }
        if self.data.synthetic == self.data.train.is_some() {
            return Err(bad(
                "data.train",
                "set exactly one of data.train (a shard directory) or data.synthetic: true".into(),
            ));
        }
        let p = &self.parallel;
        if !m.num_heads.is_multiple_of(p.tensor) || !m.kv_heads().is_multiple_of(p.tensor) {
            return Err(bad(
                "parallel.tensor",
                format!(
                    "{} does not divide the attention heads ({})",
                    p.tensor, m.num_heads
                ),
            ));
        }
        if !m.intermediate_size.is_multiple_of(p.tensor) {
            return Err(bad(
                "parallel.tensor",
                format!("{} does not divide model.intermediate_size", p.tensor),
            ));
        }
        // Both change the units of a layer by global unit index; not implemented over
        // blocks of units split across ranks.
        if p.tensor > 1 && self.sparsity.repack_every > 0 {
            return Err(bad(
                "sparsity.repack_every",
                format!(
                    "physical repacking is not available with parallel.tensor = {} (set 0)",
                    p.tensor
                ),
            ));
        }
        if p.tensor > 1 && self.sparsity.reinit_dead {
            return Err(bad(
                "sparsity.reinit_dead",
                format!(
                    "dead-unit re-initialisation is not available with parallel.tensor = {} (set false)",
                    p.tensor
                ),
            ));
        }
        Ok(())
    }
}

/// The small models the unit tests build.
#[cfg(test)]
impl ModelConfig {
    /// 50 tokens, D 16, H 24, 2 layers of 4 heads (2 key/value heads), untied.
    pub(crate) fn tiny() -> ModelConfig {
        ModelConfig::tiny_shaped(50, 16, 24, 2, 12)
    }

    /// [`ModelConfig::tiny`] at another vocabulary, width, FFN size, depth and length.
    pub(crate) fn tiny_shaped(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_layers: usize,
        max_seq_len: usize,
    ) -> ModelConfig {
        ModelConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads: 4,
            num_kv_heads: Some(2),
            max_seq_len,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: false,
            init_std: 0.02,
        }
    }

    /// This shape with `heads` attention heads, as many key/value heads, tied embeddings.
    pub(crate) fn tied_mha(self, heads: usize) -> ModelConfig {
        ModelConfig {
            num_heads: heads,
            num_kv_heads: None,
            tie_embeddings: true,
            ..self
        }
    }
}

#[cfg(test)]
mod tests;
