//! One micro-batch's forward, loss and backward, run eagerly or replayed as a CUDA graph
//! (`train.cuda_graph`): the trainer and `bench train` both step through a
//! [`MicroBatchRunner`].
//!
//! Captured, a micro-batch is one graph launch instead of the ~3,000 kernel launches (and
//! their host work) of an eager 1.5b micro-batch. What a replay reads and writes lives at
//! fixed addresses: the runner owns the token buffer, the compute-dtype weight copies
//! (refreshed in place once per step) and lambda (a device scalar, set once per step); the
//! gradients accumulate into the masters' `.grad`, which stay where the first micro-batch
//! put them (zeroed in place between steps); the hybrid FFN's pool checks fold into
//! accumulators that outlive each step (`DeferredChecks`). The graph is captured again
//! whenever what it baked in changes: a layer's FFN path, the hybrid pools' sizes
//! (`sizes_generation`), the batch shape, or the address or shape of any parameter or
//! gradient (a repack, a resume). The micro-batch that precedes a capture runs eagerly (on
//! the graph's stream), as the step's real work; the capture itself executes nothing.
use crate::model::{ComputeWeights, LayerStats, Llama, TrainingForward};
use anyhow::{anyhow, Result};
use sparse_kernels::cuda::sizes_generation;
use sparse_kernels::cuda_runtime;
use sparse_kernels::torch::cuda_graph::CudaGraph;
use sparse_kernels::torch::panic_message;
use sparse_kernels::torch::profiler::range;
use sparse_kernels::FfnPath;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::{Device, Kind, Tensor};

/// Runs micro-batches over one model (see the module's text).
pub struct MicroBatchRunner {
    graphs: bool,
    /// The compute copies and the parameter layout they were made for.
    weights: Option<(ComputeWeights, Vec<TensorAt>)>,
    /// lambda as an f32 device scalar (the L1 term's weight in the loss).
    lambda: Option<Tensor>,
    captured: Option<Captured>,
    captures: usize,
}

/// A parameter's or gradient's address and shape (address 0: no gradient yet).
#[derive(Clone, Debug, PartialEq)]
struct TensorAt(usize, Vec<i64>);

impl TensorAt {
    fn of(t: &Tensor) -> TensorAt {
        match t.defined() {
            true => TensorAt(t.data_ptr() as usize, t.size()),
            false => TensorAt(0, Vec::new()),
        }
    }
}

/// Everything a captured micro-batch baked in besides the runner's own buffers.
#[derive(Clone, Debug, PartialEq)]
struct CaptureKey {
    paths: Vec<FfnPath>,
    batch: Vec<i64>,
    step_tokens: u64,
    pool_sizes: u64,
    tensors: Vec<TensorAt>,
}

struct Captured {
    graph: CudaGraph,
    /// The token buffer `[B, T + 1]` the graph reads.
    batch: Tensor,
    /// The outputs the graph writes, rewritten by each replay.
    out: TrainingForward,
    key: CaptureKey,
}

impl MicroBatchRunner {
    /// `graphs`: capture and replay on CUDA (ignored on the CPU, where every micro-batch
    /// runs eagerly).
    pub fn new(graphs: bool) -> MicroBatchRunner {
        MicroBatchRunner {
            graphs,
            weights: None,
            lambda: None,
            captured: None,
            captures: 0,
        }
    }

    /// How many times a micro-batch was captured so far.
    pub fn captures(&self) -> usize {
        self.captures
    }

    /// Before a step's micro-batches (after the last update): the compute copies cast from
    /// the masters, in place where the layout is unchanged, and lambda set.
    pub fn begin_step(&mut self, model: &Llama, lambda: f64) {
        let layout: Vec<TensorAt> = model.parameters().into_iter().map(TensorAt::of).collect();
        match &self.weights {
            Some((w, at)) if *at == layout => model.refresh_compute_weights(w),
            _ => {
                // New copies: a graph over the old ones must not run again.
                self.captured = None;
                self.weights = Some((model.compute_weights(), layout));
            }
        }
        let device = model.embed.device();
        let lam = self
            .lambda
            .get_or_insert_with(|| Tensor::zeros([], (Kind::Float, device)));
        let _ = tch::no_grad(|| lam.fill_(lambda));
    }

    /// Forward and backward of one micro-batch `batch: [B, T + 1]` (tokens, then targets
    /// shifted by one; any device), its loss `(CE sum + lambda L1 sum) / step_tokens`
    /// accumulating into the gradients. Returns its detached sums and statistics.
    pub fn run(
        &mut self,
        model: &Llama,
        batch: &Tensor,
        paths: &[FfnPath],
        step_tokens: u64,
    ) -> Result<TrainingForward> {
        let device = model.embed.device();
        if !(self.graphs && device.is_cuda()) {
            let batch = batch.to_device(device);
            return Ok(self.eager(model, &batch, paths, step_tokens));
        }
        let key = self.key(model, batch, paths, step_tokens);
        if let Some(c) = self.captured.as_mut().filter(|c| c.key == key) {
            tch::no_grad(|| c.batch.copy_(batch));
            let replay = range(c"micro_batch.replay");
            c.graph.replay()?;
            drop(replay);
            // Copies: the next replay rewrites the graph's own outputs.
            return Ok(each_output(&c.out, Tensor::copy));
        }
        self.captured = None;
        self.capture(model, batch, paths, step_tokens, device)
    }

    /// Runs `batch` eagerly (the step's real micro-batch), then records the same work over
    /// the runner's buffers; returns the eager run's results.
    fn capture(
        &mut self,
        model: &Llama,
        batch: &Tensor,
        paths: &[FfnPath],
        step_tokens: u64,
        device: Device,
    ) -> Result<TrainingForward> {
        // The runner's own buffer (never an alias of the caller's tensor).
        let mut buffer = Tensor::empty(batch.size(), (batch.kind(), device));
        tch::no_grad(|| buffer.copy_(batch));
        // The micro-batch with its panics caught: a capture must end, whatever the step does.
        let run = || {
            catch_unwind(AssertUnwindSafe(|| {
                self.eager(model, &buffer, paths, step_tokens)
            }))
            .map_err(panic_message)
        };
        let mut first = None;
        let mut recorded = None;
        // The eager run on the graph's stream: the autograd nodes it creates (the leaves'
        // gradient accumulators, which outlive a backward) then sit on the stream the capture
        // records, which must not wait on another; it also loads every kernel and sets up the
        // libraries' handles there. Its cached blocks go back to the driver before the
        // capture allocates the graph's own pool.
        let graph = CudaGraph::capture(
            device,
            || {
                first = Some(run()?);
                cuda_runtime::empty_cache();
                Ok::<(), String>(())
            },
            || {
                recorded = Some(run()?);
                Ok(())
            },
        )
        .map_err(|e| {
            anyhow!("{e} (train.cuda_graph: the micro-batch could not be captured; set it false to train eagerly)")
        })?;
        let first = first.expect("the warm-up ran the micro-batch");
        let out = recorded.expect("a successful capture recorded the micro-batch");
        // After the first micro-batch every gradient exists: the key holds their addresses.
        let key = self.key(model, batch, paths, step_tokens);
        self.captured = Some(Captured {
            graph,
            batch: buffer,
            out,
            key,
        });
        self.captures += 1;
        Ok(first)
    }

    fn eager(
        &self,
        model: &Llama,
        batch: &Tensor,
        paths: &[FfnPath],
        step_tokens: u64,
    ) -> TrainingForward {
        let (weights, _) = self
            .weights
            .as_ref()
            .expect("begin_step runs before the step's micro-batches");
        let lambda = self.lambda.as_ref().expect("begin_step sets lambda");
        let seq = batch.size()[1] - 1;
        let inputs = batch.narrow(1, 0, seq);
        let targets = batch.narrow(1, 1, seq);
        let forward = range(c"micro_batch.forward");
        let out = model.training_forward(weights, &inputs, &targets, paths);
        // Sums over this micro-batch divided by the global token count: the gradients
        // accumulate to the exact global mean, whatever the accumulation or world size.
        let loss = (&out.ce_sum + &out.l1_sum * lambda) / step_tokens as f64;
        drop(forward);
        let backward = range(c"micro_batch.backward");
        loss.backward();
        drop(backward);
        // Detached, the statistics hold no autograd graph alive past the backward.
        each_output(&out, Tensor::detach)
    }

    fn key(
        &self,
        model: &Llama,
        batch: &Tensor,
        paths: &[FfnPath],
        step_tokens: u64,
    ) -> CaptureKey {
        let params = model.parameters();
        let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
        let tensors = params
            .into_iter()
            .map(TensorAt::of)
            .chain(grads.iter().map(TensorAt::of))
            .collect();
        CaptureKey {
            paths: paths.to_vec(),
            batch: batch.size(),
            step_tokens,
            pool_sizes: sizes_generation(),
            tensors,
        }
    }
}

/// `f` applied to every tensor of a micro-batch's outputs.
fn each_output(out: &TrainingForward, f: impl Fn(&Tensor) -> Tensor) -> TrainingForward {
    TrainingForward {
        ce_sum: f(&out.ce_sum),
        l1_sum: f(&out.l1_sum),
        layers: out
            .layers
            .iter()
            .map(|s| LayerStats {
                l1_sum: f(&s.l1_sum),
                active_per_token: f(&s.active_per_token),
                active_per_unit: f(&s.active_per_unit),
            })
            .collect(),
    }
}
