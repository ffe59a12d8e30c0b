//! The Llama-style decoder with the ReLU-gated sparse FFN.
//!
//! Written for one device; with tensor parallelism each rank holds its block of the attention
//! heads and FFN units (see [`super::parallel`]). Parameters live in a `VarStore` under HF Llama names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
//! except the down projection, kept transposed as `mlp.down_proj.weight_t: [H, D]` so the
//! sparse kernels read contiguous rows of live units; checkpoints export it as HF's
//! `mlp.down_proj.weight: [D, H]`.
use super::attention::{attend, attend_rotated, rope_tables};
use super::kv_cache::KvCache;
use super::parallel::{Split, TensorParallel};
use crate::config::{ModelConfig, Recompute};
use sparse_kernels::cuda_runtime::grad_mode_enabled;
use sparse_kernels::fused::linear_cross_entropy::{linear_cross_entropy, DEFAULT_CHUNK};
use sparse_kernels::fused::master_weights::master_linear;
use sparse_kernels::fused::norm::add_rms_norm;
use sparse_kernels::fused::rope::rope_qkv;
use sparse_kernels::torch::profiler::range;
use sparse_kernels::{try_sparse_ffn, FfnPath, FfnWeights, SparseFfnConfig};
use std::rc::Rc;
use tch::nn::{Init, Path, VarStore};
use tch::{Kind, Tensor};

mod recomputed;

pub struct Block {
    pub input_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub post_norm: Tensor,
    /// `[H, D]`
    pub gate: Tensor,
    /// `[H, D]`
    pub up: Tensor,
    /// `[H, D]`
    pub down_t: Tensor,
}

/// Per-layer FFN activity of one forward, as device tensors (read only when logged).
pub struct LayerStats {
    /// `sum_t sum_j |h_tj|`, detached.
    pub l1_sum: Tensor,
    /// Active units per token `[N]`.
    pub active_per_token: Tensor,
    /// Tokens each unit fired on `[H]`.
    pub active_per_unit: Tensor,
}

pub struct ForwardOutput {
    /// `[B, T, V]` (f32)
    pub logits: Tensor,
    /// Mean over layers of `sum_t sum_j |h|` (differentiable; divide by global tokens).
    pub l1_sum: Tensor,
    pub layers: Vec<LayerStats>,
}

/// What [`Llama::training_forward`] returns: the loss sums of one micro-batch.
pub struct TrainingForward {
    /// Cross-entropy summed over the micro-batch's positions (differentiable).
    pub ce_sum: Tensor,
    /// Mean over layers of `sum_t sum_j |h|` (differentiable; divide by global tokens).
    pub l1_sum: Tensor,
    pub layers: Vec<LayerStats>,
}

/// Compute-dtype copies of every matrix, made once per optimizer step by
/// [`Llama::compute_weights`] (not once per micro-batch): the training forward multiplies by
/// them, and their gradients accumulate straight into the fp32 masters' `.grad` (see
/// `sparse_kernels::fused::master_weights`). In f32 they are the masters themselves, except
/// the stacked q/k/v.
pub struct ComputeWeights {
    blocks: Vec<BlockCompute>,
    /// The LM head's (the embedding's when tied).
    head: Tensor,
}

pub(crate) struct BlockCompute {
    /// q, k and v stacked `[(heads + 2 kv_heads) hd, D]`: one GEMM for the three.
    qkv: Tensor,
    o: Tensor,
    gate: Tensor,
    up: Tensor,
    down_t: Tensor,
}

impl Block {
    /// Another handle on the same parameters.
    pub fn shallow_clone(&self) -> Block {
        Block {
            input_norm: self.input_norm.shallow_clone(),
            q: self.q.shallow_clone(),
            k: self.k.shallow_clone(),
            v: self.v.shallow_clone(),
            o: self.o.shallow_clone(),
            post_norm: self.post_norm.shallow_clone(),
            gate: self.gate.shallow_clone(),
            up: self.up.shallow_clone(),
            down_t: self.down_t.shallow_clone(),
        }
    }
}

impl BlockCompute {
    /// Another handle on the same copies.
    pub(super) fn shallow_clone(&self) -> BlockCompute {
        BlockCompute {
            qkv: self.qkv.shallow_clone(),
            o: self.o.shallow_clone(),
            gate: self.gate.shallow_clone(),
            up: self.up.shallow_clone(),
            down_t: self.down_t.shallow_clone(),
        }
    }
}

pub struct Llama {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    /// RoPE tables `[max_seq_len, head_dim]` (see `attention::rope_tables`).
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    /// Dtype of the matrix products (bf16 for mixed precision over fp32 master weights).
    /// Weights are cast at use, differentiably, so their gradients land in fp32; norms,
    /// the residual stream, softmax statistics and the loss stay fp32.
    pub compute: Kind,
    /// The tensor-parallel group this rank's blocks belong to (`None`: the whole model).
    pub tp: Option<Rc<TensorParallel>>,
    /// What the training forward recomputes in the backward instead of keeping
    /// (`train.recompute`; `None` from the constructors).
    pub recompute: Recompute,
    /// Weight of each layer's L1 in the loss term (`sparsity.l1_layer_weights`; empty from
    /// the constructors: every layer 1).
    pub l1_layer_weights: Vec<f64>,
}

/// A `[out_dim, in_dim]` weight drawn N(0, std) at full size (the same draws whatever the
/// tensor-parallel layout), of which this rank keeps its block (`split`, as
/// `parallel::split_of` names it: a test checks they agree).
fn linear(
    p: Path,
    out_dim: usize,
    in_dim: usize,
    std: f64,
    name: &str,
    tp: Option<(&TensorParallel, Split)>,
) -> Tensor {
    let full = Tensor::randn([out_dim as i64, in_dim as i64], (Kind::Float, p.device())) * std;
    let local = match tp {
        Some((tp, split)) => tp.local(&full, split),
        None => full,
    };
    let v = p.var(name, &local.size(), Init::Const(0.0));
    tch::no_grad(|| v.shallow_clone().copy_(&local));
    v
}

fn ones(p: Path, dim: usize) -> Tensor {
    p.var("weight", &[dim as i64], Init::Const(1.0))
}

impl Llama {
    /// Creates the parameters in `vs` (HF Llama init: N(0, init_std), norms 1).
    pub fn new(vs: &VarStore, cfg: &ModelConfig) -> Llama {
        Llama::new_parallel(vs, cfg, None)
    }

    /// As [`Llama::new`], holding only this rank's block of each split parameter when `tp`
    /// is given (see [`super::parallel`]); the full model's draws either way.
    pub fn new_parallel(vs: &VarStore, cfg: &ModelConfig, tp: Option<Rc<TensorParallel>>) -> Llama {
        let rows = tp.as_deref().map(|t| (t, Split::Dim(0)));
        let cols = tp.as_deref().map(|t| (t, Split::Dim(1)));
        let root = vs.root();
        let m = root.clone() / "model";
        let d = cfg.hidden_size;
        let h = cfg.intermediate_size;
        let kv = cfg.kv_heads() * cfg.head_dim();
        let std = cfg.init_std;
        let embed = linear(
            m.clone() / "embed_tokens",
            cfg.vocab_size,
            d,
            std,
            "weight",
            None,
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let l = m.clone() / "layers" / i;
                let a = l.clone() / "self_attn";
                let f = l.clone() / "mlp";
                Block {
                    input_norm: ones(l.clone() / "input_layernorm", d),
                    q: linear(a.clone() / "q_proj", d, d, std, "weight", rows),
                    k: linear(a.clone() / "k_proj", kv, d, std, "weight", rows),
                    v: linear(a.clone() / "v_proj", kv, d, std, "weight", rows),
                    o: linear(a / "o_proj", d, d, std, "weight", cols),
                    post_norm: ones(l / "post_attention_layernorm", d),
                    gate: linear(f.clone() / "gate_proj", h, d, std, "weight", rows),
                    up: linear(f.clone() / "up_proj", h, d, std, "weight", rows),
                    down_t: linear(f / "down_proj", h, d, std, "weight_t", rows),
                }
            })
            .collect();
        let norm = ones(m / "norm", d);
        let lm_head = (!cfg.tie_embeddings)
            .then(|| linear(root / "lm_head", cfg.vocab_size, d, std, "weight", None));
        let (cos, sin) = rope_tables(cfg, vs.device());
        Llama {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            cos,
            sin,
            compute: Kind::Float,
            tp,
            recompute: Recompute::None,
            l1_layer_weights: Vec::new(),
        }
    }

    /// The model's shared state (configuration, tables, dtype, group) by handle, without its
    /// blocks: what a recomputed region keeps to run one of them again.
    pub(super) fn without_blocks(&self) -> Llama {
        Llama {
            cfg: self.cfg.clone(),
            embed: self.embed.shallow_clone(),
            blocks: Vec::new(),
            norm: self.norm.shallow_clone(),
            lm_head: self.lm_head.as_ref().map(Tensor::shallow_clone),
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            compute: self.compute,
            tp: self.tp.clone(),
            recompute: Recompute::None,
            l1_layer_weights: Vec::new(),
        }
    }

    /// Attention heads and key/value heads held by this rank.
    pub(super) fn local_heads(&self) -> (i64, i64) {
        let t = self.tp.as_ref().map_or(1, |tp| tp.size) as i64;
        (
            self.cfg.num_heads as i64 / t,
            self.cfg.kv_heads() as i64 / t,
        )
    }

    /// Megatron's `f` on the input of a split layer (the identity without tensor parallelism).
    fn enter_split(&self, x: Tensor) -> Tensor {
        match &self.tp {
            Some(tp) if tp.size > 1 => tp.copy_to_region(&x),
            _ => x,
        }
    }

    /// Megatron's `g` on the partial output of a split layer.
    fn leave_split(&self, y: Tensor) -> Tensor {
        match &self.tp {
            Some(tp) if tp.size > 1 => tp.reduce_from_region(&y),
            _ => y,
        }
    }

    /// `t` in the compute dtype (a differentiable cast; no-op when it already is).
    fn c(&self, t: &Tensor) -> Tensor {
        if t.kind() == self.compute {
            t.shallow_clone()
        } else {
            t.to_kind(self.compute)
        }
    }

    /// `x W^T` in the compute dtype.
    fn linear(&self, x: &Tensor, w: &Tensor) -> Tensor {
        self.c(x).matmul(&self.c(w).tr())
    }

    /// The FFN of `blk` on `hx: [B, T, D]` in the compute dtype; `statistics` off for
    /// inference (no L1 term or activity counts: see `SparseFfnConfig::statistics`).
    pub(crate) fn ffn(
        &self,
        blk: &Block,
        hx: &Tensor,
        path: FfnPath,
        statistics: bool,
        compute: Option<&BlockCompute>,
    ) -> sparse_kernels::FfnOutput {
        // Over the compute copies, the weight gradients go into the masters' `.grad` inside
        // the op (on CUDA added by its kernels); otherwise the masters cast at use.
        let cast;
        let w = match compute {
            Some(w) => FfnWeights::new(&w.gate, &w.up, &w.down_t).with_masters([
                &blk.gate,
                &blk.up,
                &blk.down_t,
            ]),
            None => {
                cast = [self.c(&blk.gate), self.c(&blk.up), self.c(&blk.down_t)];
                FfnWeights::new(&cast[0], &cast[1], &cast[2])
            }
        };
        let config = SparseFfnConfig {
            statistics,
            ..SparseFfnConfig::default()
        };
        try_sparse_ffn(
            &self.c(hx).view([-1, self.cfg.hidden_size as i64]),
            &w,
            path,
            &config,
        )
        .unwrap_or_else(|e| panic!("{} FFN failed: {e}", path.name()))
    }

    /// `tokens: [B, T]` int64 -> logits `[B, T, V]` and the L1 term; `paths[l]` picks each
    /// layer's FFN implementation.
    pub fn forward(&self, tokens: &Tensor, paths: &[FfnPath]) -> ForwardOutput {
        let out = self.blocks_forward(tokens, None, paths, true, None);
        let lm_head = range(c"lm_head");
        let logits = self.linear(&out.hidden, self.head()).to_kind(Kind::Float);
        drop(lm_head);
        let l1_sum = out.l1_total.expect("at least one layer") / self.blocks.len() as f64;
        ForwardOutput {
            logits,
            l1_sum,
            layers: out.layers,
        }
    }

    /// Compute-dtype copies of the weights for [`Llama::training_forward`]; make them after
    /// each optimizer update (they are stale once the masters change).
    pub fn compute_weights(&self) -> ComputeWeights {
        // Buffers of the compute dtype, filled by the one cast (`refresh_compute_weights`);
        // a master already in that dtype is its own copy.
        let copy = |t: &Tensor| match t.kind() == self.compute {
            true => t.shallow_clone(),
            false => Tensor::empty(t.size(), (self.compute, t.device())),
        };
        let w = ComputeWeights {
            blocks: self
                .blocks
                .iter()
                .map(|b| {
                    let rows = [&b.q, &b.k, &b.v].iter().map(|m| m.size()[0]).sum::<i64>();
                    BlockCompute {
                        qkv: Tensor::empty([rows, b.q.size()[1]], (self.compute, b.q.device())),
                        o: copy(&b.o),
                        gate: copy(&b.gate),
                        up: copy(&b.up),
                        down_t: copy(&b.down_t),
                    }
                })
                .collect(),
            head: copy(self.head()),
        };
        self.refresh_compute_weights(&w);
        w
    }

    /// Casts the masters into the copies `w` (made by [`Llama::compute_weights`] for this
    /// model's shapes) in place: the same values as new copies, at the same addresses (a
    /// captured micro-batch reads them there). Copies that are the masters themselves (f32)
    /// are left alone.
    pub fn refresh_compute_weights(&self, w: &ComputeWeights) {
        tch::no_grad(|| {
            let refresh = |copy: &Tensor, master: &Tensor| {
                if copy.data_ptr() != master.data_ptr() {
                    copy.shallow_clone().copy_(master);
                }
            };
            for (c, b) in w.blocks.iter().zip(&self.blocks) {
                let mut row = 0;
                for m in [&b.q, &b.k, &b.v] {
                    let rows = m.size()[0];
                    c.qkv.narrow(0, row, rows).copy_(m);
                    row += rows;
                }
                refresh(&c.o, &b.o);
                refresh(&c.gate, &b.gate);
                refresh(&c.up, &b.up);
                refresh(&c.down_t, &b.down_t);
            }
            refresh(&w.head, self.head());
        })
    }

    /// Every parameter, in a fixed order (the tied head once).
    pub fn parameters(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.embed, &self.norm];
        all.extend(self.lm_head.as_ref());
        for b in &self.blocks {
            all.extend([
                &b.input_norm,
                &b.q,
                &b.k,
                &b.v,
                &b.o,
                &b.post_norm,
                &b.gate,
                &b.up,
                &b.down_t,
            ]);
        }
        all
    }

    /// The training forward of one micro-batch, `tokens, targets: [B, T]` (int64), over the
    /// copies `w` (from [`Llama::compute_weights`]): one GEMM for q, k and v, no weight cast,
    /// and the LM head fused with the cross-entropy in row chunks (the `[B T, V]` logits
    /// never exist). The same function as [`Llama::forward`] followed by [`cross_entropy`]
    /// (summed), to rounding: a test holds them together.
    pub fn training_forward(
        &self,
        w: &ComputeWeights,
        tokens: &Tensor,
        targets: &Tensor,
        paths: &[FfnPath],
    ) -> TrainingForward {
        let out = self.blocks_forward(tokens, None, paths, true, Some(w));
        let lm_head = range(c"lm_head");
        let ce = linear_cross_entropy(&out.hidden, &w.head, self.head(), targets, DEFAULT_CHUNK)
            .unwrap_or_else(|e| panic!("{e}"));
        drop(lm_head);
        TrainingForward {
            ce_sum: ce.loss_sum,
            l1_sum: out.l1_total.expect("at least one layer") / self.blocks.len() as f64,
            layers: out.layers,
        }
    }

    /// The LM head's master weight (the embedding's when tied).
    pub(super) fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Inference forward of `tokens: [B, T]` placed at positions `cache.len()..+T`: RoPE at
    /// those positions, attention over the cached keys/values plus the new ones (which are
    /// appended to the cache). With `cache = None` it is a plain causal forward from position
    /// 0 (what [`Llama::forward`] computes, without its statistics).
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        cache: Option<&mut KvCache>,
        paths: &[FfnPath],
        output: CachedOutput,
    ) -> Tensor {
        assert!(
            self.tp.as_ref().is_none_or(|tp| tp.size == 1),
            "forward_cached runs the whole model in one process (no tensor parallelism)"
        );
        let t = tokens.size2().expect("tokens must be [B, T]").1;
        let x = self
            .blocks_forward(tokens, cache, paths, false, None)
            .hidden;
        let x = match output {
            CachedOutput::Hidden => return x,
            CachedOutput::LastLogits => x.narrow(1, t - 1, 1),
            CachedOutput::AllLogits => x,
        };
        self.linear(&x, self.head()).to_kind(Kind::Float)
    }

    /// The decoder blocks and the final norm over `tokens: [B, T]`, the one loop behind
    /// [`Llama::forward`] and [`Llama::forward_cached`]: at positions `cache.len()..+T` when
    /// a cache is given (which it extends), from 0 otherwise; with `statistics`, the FFN's
    /// L1 term and activity counts per layer (training); over the compute copies `weights`
    /// when given (the training forward), casting the masters at use otherwise.
    fn blocks_forward(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        paths: &[FfnPath],
        statistics: bool,
        weights: Option<&ComputeWeights>,
    ) -> BlocksOutput {
        let t = tokens.size2().expect("tokens must be [B, T]").1;
        let pos = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = &cache {
            assert!(
                pos + t <= c.capacity(),
                "KV cache holds {} positions, {} + {t} requested",
                c.capacity(),
                pos
            );
        }
        assert!(
            pos + t <= self.cfg.max_seq_len as i64,
            "position {} beyond max_seq_len {}",
            pos + t,
            self.cfg.max_seq_len
        );
        let mut x = Tensor::embedding(&self.embed, tokens, -1, false, false);
        // A sublayer's output is added to the residual stream by the next norm, which the
        // training forward fuses with that add (`sparse_kernels::fused::norm`).
        let mut pending: Option<Tensor> = None;
        // Recompute pays only where a backward follows: the training forward with grad on.
        let recompute = match weights {
            Some(_) if grad_mode_enabled() => self.recompute,
            _ => Recompute::None,
        };
        let mut l1_total: Option<Tensor> = None;
        let mut layers = Vec::with_capacity(if statistics { self.blocks.len() } else { 0 });
        for (l, (blk, &path)) in self.blocks.iter().zip(paths).enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let compute = weights.map(|w| &w.blocks[l]);
            let mode = LayerMode {
                path,
                statistics,
                recompute_ffn: recompute == Recompute::Ffn,
            };
            let out = match (recompute, compute) {
                (Recompute::Full, Some(w)) => {
                    self.recomputed_block(blk, w, (&x, pending.as_ref()), mode)
                }
                _ => self.layer(blk, compute, (&x, pending.as_ref()), (pos, kv), mode),
            };
            x = out.residual;
            pending = Some(out.delta);
            if !statistics {
                continue;
            }
            // Local units' activity, summed over the group: per token and the L1 value of
            // the whole layer (`l1_total` stays local: it is this rank's loss term).
            let mut active_per_token = out.active_per_token;
            let mut l1 = out.l1_sum.detach().copy();
            if let Some(tp) = self.tp.as_ref().filter(|tp| tp.size > 1) {
                tp.sum_stat(&mut active_per_token)
                    .and_then(|()| tp.sum_stat(&mut l1))
                    .unwrap_or_else(|e| panic!("{e}"));
            }
            layers.push(LayerStats {
                l1_sum: l1,
                active_per_token,
                active_per_unit: out.active_per_unit,
            });
            let term = match self.l1_layer_weights.get(l) {
                Some(&w) if w != 1.0 => out.l1_sum * w,
                _ => out.l1_sum,
            };
            l1_total = Some(match l1_total {
                None => term,
                Some(acc) => acc + term,
            });
        }
        if let Some(c) = cache {
            c.len += t;
        }
        BlocksOutput {
            hidden: self
                .add_norm(&x, pending.as_ref(), &self.norm, weights.is_some())
                .1,
            l1_total,
            layers,
        }
    }

    /// `x + delta` (x alone without delta) and its RMSNorm with weight `w` in the compute
    /// dtype: the fused op in the training forward (`fused`), ATen's RMSNorm otherwise.
    fn add_norm(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        w: &Tensor,
        fused: bool,
    ) -> (Tensor, Tensor) {
        let eps = self.cfg.rms_norm_eps;
        if fused {
            let n = add_rms_norm(x, delta, w, eps, self.compute).unwrap_or_else(|e| panic!("{e}"));
            return (n.residual, n.normed);
        }
        let residual = delta.map_or_else(|| x.shallow_clone(), |d| x + d);
        let normed = rms_norm(&residual, w, eps);
        (residual, normed)
    }

    /// One decoder layer on `(x, pending)`, the residual stream and the previous FFN's output
    /// still to be added to it, at positions `pos..pos + T` (extending `kv` when given), over
    /// the compute copies when given. With `mode.recompute_ffn` the FFN is a recomputed region.
    pub(super) fn layer(
        &self,
        blk: &Block,
        compute: Option<&BlockCompute>,
        (x, pending): (&Tensor, Option<&Tensor>),
        (pos, kv): (i64, Option<&mut (Tensor, Tensor)>),
        mode: LayerMode,
    ) -> LayerOutput {
        let (b, t, _) = x.size3().expect("the residual stream is [B, T, D]");
        let fused = compute.is_some();
        let attention = range(c"attention");
        let (residual, ax) = self.add_norm(x, pending, &blk.input_norm, fused);
        let a = self.leave_split(self.attention(blk, &self.enter_split(ax), pos, kv, compute));
        drop(attention);
        let ffn = range(c"ffn");
        let (residual, hx) = self.add_norm(&residual, Some(&a), &blk.post_norm, fused);
        let hx = self.enter_split(hx);
        let out = match compute {
            Some(w) if mode.recompute_ffn => self.recomputed_ffn(blk, w, &hx, mode),
            _ => self.ffn(blk, &hx, mode.path, mode.statistics, compute),
        };
        let delta = self.leave_split(out.y.view([b, t, -1]));
        drop(ffn);
        LayerOutput {
            residual,
            delta,
            l1_sum: out.l1_sum,
            active_per_token: out.active_per_token,
            active_per_unit: out.active_per_unit,
        }
    }

    /// Attention over this rank's heads of `x: [B, T, D]` at positions `pos..pos + T`
    /// (extending `kv` when given); with tensor parallelism the output is partial (the
    /// caller sums it over the group). Over the compute copies when given: q, k and v from
    /// one GEMM, rotated and split into heads in one pass.
    fn attention(
        &self,
        blk: &Block,
        x: &Tensor,
        pos: i64,
        kv: Option<&mut (Tensor, Tensor)>,
        compute: Option<&BlockCompute>,
    ) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let hd = self.cfg.head_dim() as i64;
        let (nh, nkv) = self.local_heads();
        let heads = |y: Tensor, n: i64| y.view([b, t, n, hd]).transpose(1, 2);
        let fused = |x: &Tensor, w: &Tensor, masters: &[&Tensor]| {
            master_linear(x, w, masters).unwrap_or_else(|e| panic!("{e}"))
        };
        let y = match compute {
            Some(w) => {
                // One GEMM for q, k and v, then RoPE and the head split in one pass.
                let qkv = fused(x, &w.qkv, &[&blk.q, &blk.k, &blk.v]);
                let [q, k, v] = rope_qkv(&qkv, (&self.cos, &self.sin), nh, nkv, pos)
                    .unwrap_or_else(|e| panic!("{e}"));
                attend_rotated(&q, &k, &v, pos, kv)
            }
            None => {
                let q = heads(self.linear(x, &blk.q), nh);
                let k = heads(self.linear(x, &blk.k), nkv);
                let v = heads(self.linear(x, &blk.v), nkv);
                attend(&q, &k, &v, (&self.cos, &self.sin), pos, kv)
            }
        };
        let y = y.transpose(1, 2).contiguous().view([b, t, nh * hd]);
        match compute {
            Some(w) => fused(&y, &w.o, &[&blk.o]),
            None => self.linear(&y, &blk.o),
        }
    }
}

/// How [`Llama::layer`] runs its FFN.
#[derive(Clone, Copy)]
pub(super) struct LayerMode {
    pub(super) path: FfnPath,
    /// The L1 term and activity counts (training).
    pub(super) statistics: bool,
    /// The FFN as a recomputed region (`train.recompute: ffn`).
    pub(super) recompute_ffn: bool,
}

/// What one decoder layer hands the block loop.
pub(super) struct LayerOutput {
    /// The residual stream after the attention add, `[B, T, D]`.
    pub(super) residual: Tensor,
    /// The FFN's output summed over the group, `[B, T, D]`: the next norm adds it.
    pub(super) delta: Tensor,
    /// The FFN's L1 term over this rank's units (differentiable).
    pub(super) l1_sum: Tensor,
    /// This rank's active units per token `[N]` and tokens per unit `[H]`.
    pub(super) active_per_token: Tensor,
    pub(super) active_per_unit: Tensor,
}

/// What the block loop hands to [`Llama::forward`] and [`Llama::forward_cached`].
struct BlocksOutput {
    /// Final-norm hidden states `[B, T, D]`.
    hidden: Tensor,
    /// Sum over layers of this rank's differentiable L1 term (`None` without statistics).
    l1_total: Option<Tensor>,
    layers: Vec<LayerStats>,
}

/// What [`Llama::forward_cached`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachedOutput {
    /// The final-norm hidden states `[B, T, D]` (no LM head).
    Hidden,
    /// Logits `[B, 1, V]` (f32) of the last position only.
    LastLogits,
    /// Logits `[B, T, V]` (f32) of every position.
    AllLogits,
}

/// A model on the CPU drawn after seeding torch with `seed`, for the unit tests.
#[cfg(test)]
pub(crate) fn seeded_model(seed: i64, cfg: &ModelConfig) -> (VarStore, Llama) {
    seeded(seed, || {
        let vs = VarStore::new(tch::Device::Cpu);
        let model = Llama::new(&vs, cfg);
        (vs, model)
    })
}

/// `init` run right after seeding the global generator with `seed`, one such call at a
/// time: tests run in parallel threads over that one generator, and two seeded inits must
/// not interleave their draws.
#[cfg(test)]
pub(crate) fn seeded<T>(seed: i64, init: impl FnOnce() -> T) -> T {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    init()
}

/// Casts a model to bf16 for inference: the weights, and the dtype its matrix products run
/// in (the KV cache and attention then stay bf16 end to end).
pub fn to_bf16(vs: &mut VarStore, model: &mut Llama) {
    vs.bfloat16();
    model.compute = Kind::BFloat16;
}

/// Cross-entropy of `logits: [..., V]` against the token ids `targets: [...]` (int64),
/// summed or averaged over positions as `reduction` says.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, reduction: tch::Reduction) -> Tensor {
    let v = *logits
        .size()
        .last()
        .expect("logits have a vocabulary dimension");
    logits.view([-1, v]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]),
        None,
        reduction,
        -100,
        0.0,
    )
}

/// RMSNorm computed in f32, cast back to the input dtype, then scaled (HF Llama order).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    if kind == Kind::Float && w.kind() == Kind::Float {
        // All f32 (the training residual stream): the same function as ATen's RMSNorm, which
        // is one fused kernel forward and one backward on CUDA.
        return x.rms_norm([w.size()[0]], Some(w), eps);
    }
    let xf = x.to_kind(Kind::Float);
    let r = (xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + eps).rsqrt();
    w * (xf * r).to_kind(kind)
}

#[cfg(test)]
mod tests;
