//! The tensor-parallel layout of a fresh model, in a test binary of its own: it seeds torch's
//! global generator and compares two inits drawn from it, which other tests running in
//! parallel threads of the same binary would interleave with.
use sparse_train::config::ModelConfig;
use sparse_train::model::parallel::{split_of, Split, TensorParallel};
use sparse_train::model::Llama;
use tch::nn::VarStore;
use tch::Device;

/// Rank r of 2 holds exactly block r (per `split_of`) of the full model's draws.
#[test]
fn blocks_are_the_full_models_slices_named_by_split_of() {
    let cfg = ModelConfig {
        vocab_size: 50,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: Some(2),
        max_seq_len: 8,
        rope_theta: 1e4,
        rms_norm_eps: 1e-5,
        tie_embeddings: false,
        init_std: 0.02,
    };
    let full_vs = VarStore::new(Device::Cpu);
    tch::manual_seed(3);
    let _full = Llama::new(&full_vs, &cfg);
    let full = full_vs.variables();
    for rank in 0..2 {
        let tp = TensorParallel::detached(rank, 2);
        let vs = VarStore::new(Device::Cpu);
        tch::manual_seed(3);
        let _m = Llama::new_parallel(&vs, &cfg, Some(tp.clone()));
        let local = vs.variables();
        assert_eq!(local.len(), full.len());
        let mut split = 0;
        for (name, f) in &full {
            let s = split_of(name);
            split += usize::from(s != Split::Replicated);
            let want = tp.local(f, s);
            assert!(local[name].equal(&want), "{name} on rank {rank}");
        }
        assert_eq!(split, 2 * 7, "q, k, v, o, gate, up, down per layer");
    }
}
