//! Activation recompute (`train.recompute`): a region of the training forward, one layer's
//! FFN (`ffn`) or its whole decoder block (`full`), runs as one autograd node that keeps only
//! its inputs. The node's forward runs the region without grad, so none of its intermediates
//! is saved. Its backward makes the kept inputs leaves, runs the region again with grad on
//! and backpropagates the outputs' gradients through that graph in one pass
//! ([`backward_with_grads`]); the inputs' gradients are what the node returns. The weights
//! are not inputs of the node: the inner pass accumulates their gradients into the masters'
//! `.grad` as the kept graph would (directly, or through `master_linear` and the FFN op's
//! masters), and the node adds nothing of its own, so each is counted once. The same
//! ops run in the same order, so losses, statistics and gradients are the un-recomputed
//! run's (on the CPU bit for bit, as `tests` checks). With tensor parallelism the
//! re-run repeats the region's collectives in the backward, in the same order on every rank.
//! The layer forms (`Llama::recomputed_ffn`, `Llama::recomputed_block`) are in `llama/recomputed.rs`.
use sparse_kernels::torch::function::{apply_function, backward_with_grads, BackwardFn};
use sparse_kernels::FfnPath;
use std::rc::Rc;
use tch::{Device, Tensor};

#[cfg(test)]
thread_local! {
    /// Region re-runs on this thread, for the tests to see recompute happen.
    static RERUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether the region's forward must run with grad on to pick the arm its re-run will: on
/// CUDA the TwELL path runs the inference kernels when no gradient is needed (no L1 term)
/// and the dense fallback when one is. Its graph is dropped with the forward.
pub(super) fn forward_needs_grad(path: FfnPath, device: Device) -> bool {
    path == FfnPath::Twell && device.is_cuda()
}

/// A region: its inputs to its outputs, in the grad mode of its caller.
pub(super) type Region = Rc<dyn Fn(&[Tensor]) -> Vec<Tensor>>;

/// Runs `region` on `inputs` as one autograd node that keeps only the inputs (see the module
/// docs); `N` outputs. Its forward runs without grad, or with grad and the graph dropped when
/// `forward_with_grad`. Outputs of integer dtype carry no gradient.
pub(super) fn checkpoint<const N: usize>(
    inputs: &[&Tensor],
    forward_with_grad: bool,
    region: Region,
) -> [Tensor; N] {
    let forward = |t: &[Tensor]| -> Result<(Vec<Tensor>, BackwardFn), String> {
        let kept: Vec<Tensor> = t.iter().map(Tensor::detach).collect();
        let outputs = if forward_with_grad {
            tch::with_grad(|| region(&kept))
        } else {
            tch::no_grad(|| region(&kept))
        };
        let region = region.clone();
        let backward: BackwardFn = Box::new(move |grads| rerun_backward(&region, &kept, grads));
        // Detached: the node's outputs are fresh tensors, not views of the region's.
        Ok((outputs.iter().map(Tensor::detach).collect(), backward))
    };
    let outputs =
        apply_function(inputs, N, &forward).unwrap_or_else(|e| panic!("recomputed region: {e}"));
    outputs.try_into().unwrap_or_else(|v: Vec<Tensor>| {
        panic!("recomputed region: {} outputs, {N} expected", v.len())
    })
}

/// The backward of a recomputed region: `region` run again with grad on from `kept` made
/// leaves, the outputs' gradients `grads` backpropagated through it in one pass (weights
/// accumulate into their `.grad` on the way), the leaves' gradients returned.
fn rerun_backward(
    region: &Region,
    kept: &[Tensor],
    grads: &[Option<Tensor>],
) -> Result<Vec<Option<Tensor>>, String> {
    #[cfg(test)]
    RERUNS.with(|n| n.set(n.get() + 1));
    let leaves: Vec<Tensor> = kept
        .iter()
        .map(|t| t.detach().set_requires_grad(true))
        .collect();
    tch::with_grad(|| {
        let outputs = region(&leaves);
        // The counts (integer, no gradient) and outputs no gradient reached stay out.
        let (outputs, grads): (Vec<&Tensor>, Vec<&Tensor>) = outputs
            .iter()
            .zip(grads)
            .filter_map(|(o, g)| Some((o, g.as_ref()?)))
            .filter(|(o, _)| o.requires_grad())
            .unzip();
        if outputs.is_empty() {
            return Ok(());
        }
        backward_with_grads(&outputs, &grads)
    })?;
    Ok(leaves
        .iter()
        .map(|leaf| Some(leaf.grad()).filter(Tensor::defined))
        .collect())
}

#[cfg(test)]
mod tests;
