//! The recomputed forms of one layer (`train.recompute`): its FFN, or its whole block, as one
//! region of [`super::super::recompute`], which keeps only the region's inputs and re-runs it
//! in the backward.
use super::super::recompute::{checkpoint, forward_needs_grad, Region};
use super::{Block, BlockCompute, LayerMode, LayerOutput, Llama};
use sparse_kernels::FfnOutput;
use std::rc::Rc;
use tch::Tensor;

/// One layer held by handle: the region's backward outlives the forward's borrows.
struct LayerHandles {
    model: Llama,
    block: Block,
    compute: BlockCompute,
}

impl LayerHandles {
    fn of(model: &Llama, block: &Block, compute: &BlockCompute) -> Rc<LayerHandles> {
        Rc::new(LayerHandles {
            model: model.without_blocks(),
            block: block.shallow_clone(),
            compute: compute.shallow_clone(),
        })
    }
}

impl Llama {
    /// The FFN of `blk` on `hx: [B, T, D]` (this rank's split input), as [`Llama::ffn`] over the
    /// compute copies `compute`, keeping only `hx` for the backward.
    pub(super) fn recomputed_ffn(
        &self,
        blk: &Block,
        compute: &BlockCompute,
        hx: &Tensor,
        mode: LayerMode,
    ) -> FfnOutput {
        let layer = LayerHandles::of(self, blk, compute);
        let region: Region = Rc::new(move |inputs: &[Tensor]| {
            let out = layer.model.ffn(
                &layer.block,
                &inputs[0],
                mode.path,
                mode.statistics,
                Some(&layer.compute),
            );
            vec![
                out.y,
                out.l1_sum,
                out.active_per_token,
                out.active_per_unit,
                out.overflow_rows,
            ]
        });
        let with_grad = forward_needs_grad(mode.path, hx.device());
        let [y, l1_sum, active_per_token, active_per_unit, overflow_rows] =
            checkpoint(&[hx], with_grad, region);
        FfnOutput {
            y,
            l1_sum,
            active_per_token,
            active_per_unit,
            overflow_rows,
        }
    }

    /// The decoder block `blk` (attention and FFN, as [`Llama::layer`] over the compute copies
    /// `compute`, from position 0) on the residual stream `x` and the previous FFN's output
    /// `pending`, keeping only those two for the backward.
    pub(super) fn recomputed_block(
        &self,
        blk: &Block,
        compute: &BlockCompute,
        (x, pending): (&Tensor, Option<&Tensor>),
        mode: LayerMode,
    ) -> LayerOutput {
        let layer = LayerHandles::of(self, blk, compute);
        let has_pending = pending.is_some();
        let mode = LayerMode {
            recompute_ffn: false,
            ..mode
        };
        let region: Region = Rc::new(move |inputs: &[Tensor]| {
            let stream = (&inputs[0], has_pending.then(|| &inputs[1]));
            let out =
                layer
                    .model
                    .layer(&layer.block, Some(&layer.compute), stream, (0, None), mode);
            vec![
                out.residual,
                out.delta,
                out.l1_sum,
                out.active_per_token,
                out.active_per_unit,
            ]
        });
        let inputs: Vec<&Tensor> = std::iter::once(x).chain(pending).collect();
        let with_grad = forward_needs_grad(mode.path, x.device());
        let [residual, delta, l1_sum, active_per_token, active_per_unit] =
            checkpoint(&inputs, with_grad, region);
        LayerOutput {
            residual,
            delta,
            l1_sum,
            active_per_token,
            active_per_unit,
        }
    }
}
