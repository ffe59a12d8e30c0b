//! The Llama-style decoder with the ReLU-gated sparse FFN.
//!
//! Written for one device; with tensor parallelism each rank holds its block of the attention
//! heads and FFN units (see `tensor_parallel`). Parameters live
//! in a `VarStore` under HF Llama names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
//! except the down projection, kept transposed as `mlp.down_proj.weight_t: [H, D]` so the
//! sparse kernels read contiguous rows of live units; checkpoints export it as HF's
//! `mlp.down_proj.weight: [D, H]`.
use crate::config::ModelConfig;
use crate::tensor_parallel::{Split, TensorParallel};
use sparse_kernels::{try_sparse_ffn, FfnPath, FfnWeights, SparseFfnConfig};
use std::rc::Rc;
use tch::nn::{Init, Path, VarStore};
use tch::{Device, Kind, Tensor};

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

pub struct Llama {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    /// Dtype of the matrix products (bf16 for mixed precision over fp32 master weights).
    /// Weights are cast at use, differentiably, so their gradients land in fp32; norms,
    /// the residual stream, softmax statistics and the loss stay fp32.
    pub compute: Kind,
    /// The tensor-parallel group this rank's blocks belong to (`None`: the whole model).
    pub tp: Option<Rc<TensorParallel>>,
}

/// A `[out_dim, in_dim]` weight drawn N(0, std) at full size (the same draws whatever the
/// tensor-parallel layout), of which this rank keeps its block (`split`, as
/// `tensor_parallel::split_of` names it: a test checks they agree).
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
    /// is given (see [`crate::tensor_parallel`]); the full model's draws either way.
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
        }
    }

    /// Attention heads and key/value heads held by this rank.
    fn local_heads(&self) -> (i64, i64) {
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
    ) -> sparse_kernels::FfnOutput {
        let (gate, up, down_t) = (self.c(&blk.gate), self.c(&blk.up), self.c(&blk.down_t));
        let w = FfnWeights {
            gate: &gate,
            up: &up,
            down_t: &down_t,
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
        let (b, t) = tokens.size2().expect("tokens must be [B, T]");
        let mut x = Tensor::embedding(&self.embed, tokens, -1, false, false);
        let mut l1_total: Option<Tensor> = None;
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (blk, &path) in self.blocks.iter().zip(paths) {
            let ax = self.enter_split(rms_norm(&x, &blk.input_norm, self.cfg.rms_norm_eps));
            x = &x + self.leave_split(self.attention(blk, &ax, t));
            let hx = self.enter_split(rms_norm(&x, &blk.post_norm, self.cfg.rms_norm_eps));
            let out = self.ffn(blk, &hx, path, true);
            x = &x + self.leave_split(out.y.view([b, t, -1]));
            // Local units' activity, summed over the group: per token and the L1 value of
            // the whole layer (`l1_sum` below stays local: it is this rank's loss term).
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
            l1_total = Some(match l1_total {
                None => out.l1_sum,
                Some(acc) => acc + out.l1_sum,
            });
        }
        let x = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = self.linear(&x, head).to_kind(Kind::Float);
        let l1_sum = l1_total.expect("at least one layer") / self.blocks.len() as f64;
        ForwardOutput {
            logits,
            l1_sum,
            layers,
        }
    }

    /// Attention over this rank's heads; with tensor parallelism the output is partial (the
    /// caller sums it over the group).
    fn attention(&self, blk: &Block, x: &Tensor, t: i64) -> Tensor {
        let (b, _, _) = x.size3().unwrap();
        let hd = self.cfg.head_dim() as i64;
        let (nh, nkv) = self.local_heads();
        let q = self.linear(x, &blk.q).view([b, t, nh, hd]).transpose(1, 2);
        let k = self.linear(x, &blk.k).view([b, t, nkv, hd]).transpose(1, 2);
        let v = self.linear(x, &blk.v).view([b, t, nkv, hd]).transpose(1, 2);
        let cos = self.cos.narrow(0, 0, t);
        let sin = self.sin.narrow(0, 0, t);
        let q = apply_rope(&q, &cos, &sin);
        let k = apply_rope(&k, &cos, &sin);
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<&Tensor>,
            0.0,
            true,
            None,
            nh != nkv,
        );
        self.linear(
            &y.transpose(1, 2).contiguous().view([b, t, nh * hd]),
            &blk.o,
        )
    }
}

/// Keys and values of past positions for incremental decoding: per layer, `k, v:
/// [B, kv_heads, capacity, head_dim]`, preallocated; positions `0..len` are filled.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: i64,
    capacity: i64,
}

impl KvCache {
    /// An empty cache for `batch` sequences of at most `capacity` positions, in `kind` on
    /// `device` (the dtype of the model's activations: bf16 for a bf16 model).
    pub fn new(
        cfg: &ModelConfig,
        batch: i64,
        capacity: i64,
        kind: Kind,
        device: Device,
    ) -> KvCache {
        let shape = [
            batch,
            cfg.kv_heads() as i64,
            capacity,
            cfg.head_dim() as i64,
        ];
        let layers = (0..cfg.num_layers)
            .map(|_| {
                (
                    Tensor::zeros(shape, (kind, device)),
                    Tensor::zeros(shape, (kind, device)),
                )
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> i64 {
        self.capacity
    }
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

impl Llama {
    /// Inference forward of `tokens: [B, T]` placed at positions `cache.len()..+T`: RoPE at
    /// those positions, attention over the cached keys/values plus the new ones (which are
    /// appended to the cache). With `cache = None` it is a plain causal forward from position
    /// 0 (what [`Llama::forward`] computes, without its statistics). Causal SDPA when the
    /// cache was empty (prefill), no mask for one new token, an explicit mask otherwise.
    pub fn forward_cached(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        paths: &[FfnPath],
        output: CachedOutput,
    ) -> Tensor {
        let (b, t) = tokens.size2().expect("tokens must be [B, T]");
        assert!(
            self.tp.as_ref().is_none_or(|tp| tp.size == 1),
            "forward_cached runs the whole model in one process (no tensor parallelism)"
        );
        let pos = cache.as_ref().map_or(0, |c| c.len);
        if let Some(c) = &cache {
            assert!(
                pos + t <= c.capacity,
                "KV cache holds {} positions, {} + {t} requested",
                c.capacity,
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
        for (l, (blk, &path)) in self.blocks.iter().zip(paths).enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            let a = self.attention_cached(
                blk,
                &rms_norm(&x, &blk.input_norm, self.cfg.rms_norm_eps),
                pos,
                kv,
            );
            x = &x + a;
            let hx = rms_norm(&x, &blk.post_norm, self.cfg.rms_norm_eps);
            let out = self.ffn(blk, &hx, path, false);
            x = &x + out.y.view([b, t, -1]);
        }
        if let Some(c) = cache {
            c.len += t;
        }
        let x = rms_norm(&x, &self.norm, self.cfg.rms_norm_eps);
        let x = match output {
            CachedOutput::Hidden => return x,
            CachedOutput::LastLogits => x.narrow(1, t - 1, 1),
            CachedOutput::AllLogits => x,
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        self.linear(&x, head).to_kind(Kind::Float)
    }

    fn attention_cached(
        &self,
        blk: &Block,
        x: &Tensor,
        pos: i64,
        kv: Option<&mut (Tensor, Tensor)>,
    ) -> Tensor {
        let (b, t, d) = x.size3().unwrap();
        let hd = self.cfg.head_dim() as i64;
        let nh = self.cfg.num_heads as i64;
        let nkv = self.cfg.kv_heads() as i64;
        let q = self.linear(x, &blk.q).view([b, t, nh, hd]).transpose(1, 2);
        let k = self.linear(x, &blk.k).view([b, t, nkv, hd]).transpose(1, 2);
        let v = self.linear(x, &blk.v).view([b, t, nkv, hd]).transpose(1, 2);
        let cos = self.cos.narrow(0, pos, t);
        let sin = self.sin.narrow(0, pos, t);
        let q = apply_rope(&q, &cos, &sin);
        let k = apply_rope(&k, &cos, &sin);
        let (k, v) = match kv {
            None => (k, v),
            Some((kc, vc)) => {
                kc.narrow(2, pos, t).copy_(&k);
                vc.narrow(2, pos, t).copy_(&v);
                (kc.narrow(2, 0, pos + t), vc.narrow(2, 0, pos + t))
            }
        };
        // Query i (position pos + i) sees keys 0..=pos + i.
        let mask = (pos > 0 && t > 1).then(|| {
            let dev = x.device();
            let qi = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(1) + pos;
            let kj = Tensor::arange(pos + t, (Kind::Int64, dev)).unsqueeze(0);
            kj.le_tensor(&qi)
        });
        let y = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            pos == 0 && t > 1,
            None,
            nh != nkv,
        );
        self.linear(&y.transpose(1, 2).contiguous().view([b, t, d]), &blk.o)
    }
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
    let xf = x.to_kind(Kind::Float);
    let r = (xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float) + eps).rsqrt();
    w * (xf * r).to_kind(kind)
}

/// cos/sin tables `[max_seq_len, head_dim]` in HF's rotate-half layout.
fn rope_tables(cfg: &ModelConfig, device: Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim() as i64;
    let inv_freq = (Tensor::arange_start_step(0, hd, 2, (Kind::Float, device)) / hd as f64)
        .multiply_scalar(cfg.rope_theta.ln())
        .exp()
        .reciprocal();
    let pos = Tensor::arange(cfg.max_seq_len as i64, (Kind::Float, device));
    let freqs = pos.outer(&inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos(), emb.sin())
}

/// `x: [B, heads, T, hd]`
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = x.size()[3];
    let x1 = x.narrow(-1, 0, hd / 2);
    let x2 = x.narrow(-1, hd / 2, hd / 2);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
    let kind = x.kind();
    (x * cos.to_kind(kind)) + rotated * sin.to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: Some(2),
            max_seq_len: 12,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_embeddings: false,
            init_std: 0.02,
        }
    }

    #[test]
    fn forward_shapes_and_hf_parameter_names() {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let cfg = tiny_cfg();
        let m = Llama::new(&vs, &cfg);
        let tokens = Tensor::randint(50, [3, 7], (Kind::Int64, Device::Cpu));
        let out = m.forward(&tokens, &[FfnPath::Dense; 2]);
        assert_eq!(out.logits.size(), [3, 7, 50]);
        assert_eq!(out.layers.len(), 2);
        assert_eq!(out.layers[0].active_per_token.size(), [21]);
        assert_eq!(out.layers[0].active_per_unit.size(), [24]);
        let vars = vs.variables();
        for name in [
            "model.embed_tokens.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight_t",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert!(vars.contains_key(name), "missing {name}");
        }
        assert_eq!(
            vars["model.layers.1.self_attn.k_proj.weight"].size(),
            [8, 16]
        );
        assert_eq!(
            vars.values().map(|t| t.numel()).sum::<usize>(),
            cfg.num_params()
        );
    }

    #[test]
    fn l1_and_l0_statistics_on_a_hand_made_ffn() {
        // x = [[1, 0], [0, 1]]; g = x Wg^T, u = x Wu^T with Wg, Wu: [3, 2].
        let x = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).view([2, 2]);
        let wg = Tensor::from_slice(&[1.0f32, -1.0, -2.0, 3.0, 0.5, 0.5]).view([3, 2]);
        let wu = Tensor::from_slice(&[2.0f32, 1.0, -1.0, -4.0, 0.0, 1.0]).view([3, 2]);
        let wd = Tensor::ones([3, 2], (Kind::Float, Device::Cpu));
        // token 0: g = [1, -2, 0.5] -> relu [1, 0, 0.5]; u = [2, -1, 0] -> h = [2, 0, 0]
        // token 1: g = [-1, 3, 0.5] -> relu [0, 3, 0.5]; u = [1, -4, 1] -> h = [0, -12, 0.5]
        let w = sparse_kernels::FfnWeights {
            gate: &wg,
            up: &wu,
            down_t: &wd,
        };
        let out = sparse_kernels::sparse_ffn(&x, &w, FfnPath::Dense);
        assert_eq!(out.l1_sum.double_value(&[]), 2.0 + 12.0 + 0.5);
        assert_eq!(Vec::<i64>::try_from(&out.active_per_token).unwrap(), [1, 2]);
        assert_eq!(
            Vec::<i64>::try_from(&out.active_per_unit).unwrap(),
            [1, 1, 1]
        );
        assert_eq!(
            Vec::<f32>::try_from(out.y.reshape([-1])).unwrap(),
            [2.0, 2.0, -11.5, -11.5]
        );
    }
}
