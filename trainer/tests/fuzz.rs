//! Every reader of outside input, fuzzed: the token-shard reader, the checkpoint loader
//! (MANIFEST.json, trainer_state.json, config.json, both safetensors files), the config parser
//! with `--set` overrides, and the tokenizer-file loader. Each test feeds seeded mutations of a
//! valid seed file (`fuzz/mutate.rs`) and requires every input to end as `Ok` or a named
//! error: a panic fails the test and names the input. `SPARSE_TRAIN_FUZZ_INPUTS` sets the
//! inputs per reader (default 10,000, the CI smoke). Mutated checkpoint files get a matching
//! manifest entry 70 % of the time (and shards a matching checksum 30 %), so the parsers
//! behind the checksums are reached, not only the checksum checks.
mod fuzz {
    pub mod mutate;
}

use fuzz::mutate::{run, Mutator};
use serde_json::json;
use sparse_checkpoints::{load, save, Checkpoint, Dtype, RawTensor, MANIFEST_FILE};
use sparse_train::config::Config;
use sparse_train::data::bpe_train::{train_bpe, BpeOptions};
use sparse_train::data::shards::{write_shard, Shard};
use sparse_train::data::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::Path;

#[test]
fn fuzz_shard_reader() {
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("seed.bin");
    let tokens: Vec<u32> = (0..2000u32).map(|i| (i * 7919) % 50257).collect();
    write_shard(&seed_path, &tokens, 50257).unwrap();
    let seed = std::fs::read(&seed_path).unwrap();
    let path = dir.path().join("shard_00000.bin");
    let mut m = Mutator::new(1);
    run(
        "fuzz_shard_reader",
        |_| {
            let mut v = m.mutate(&seed);
            // A matching checksum now and then, so the header checks behind it are reached.
            if v.len() >= 64 && m.chance(0.3) {
                let crc = crc32fast::hash(&v[64..]);
                v[28..32].copy_from_slice(&crc.to_le_bytes());
            }
            v
        },
        |input| {
            std::fs::write(&path, input).unwrap();
            match Shard::open(&path) {
                Ok(s) => {
                    // An accepted shard's size is what its header announces.
                    assert!(s.tokens <= input.len());
                    true
                }
                Err(e) => {
                    assert!(e.to_string().contains("shard_00000.bin"), "unnamed: {e}");
                    false
                }
            }
        },
    );
}

fn raw(dtype: Dtype, shape: &[usize], seed: u8) -> RawTensor {
    let n = shape.iter().product::<usize>() * dtype.size_bytes();
    RawTensor {
        dtype,
        shape: shape.to_vec(),
        data: (0..n)
            .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed))
            .collect(),
    }
}

#[test]
fn fuzz_checkpoint_loader() {
    let run_dir = tempfile::tempdir().unwrap();
    let ckpt = Checkpoint {
        weights: BTreeMap::from([
            (
                "model.embed_tokens.weight".into(),
                raw(Dtype::F32, &[16, 8], 1),
            ),
            ("model.norm.weight".into(), raw(Dtype::BF16, &[8], 2)),
        ]),
        optimizer: BTreeMap::from([
            ("model.norm.weight.exp_avg".into(), raw(Dtype::F32, &[8], 3)),
            ("step".into(), raw(Dtype::I64, &[], 4)),
        ]),
        trainer_state: json!({ "step": 3, "tokens": 12288, "cursor": 6, "rng": [1, 2] }),
        hf_config: Some(json!({ "model_type": "llama", "hidden_size": 8 })),
        files: BTreeMap::from([("tokenizer.json".into(), br#"{"version":"1.0"}"#.to_vec())]),
    };
    let saved = save(run_dir.path(), 3, &ckpt, 0).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let seeds: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(saved.join(n)).unwrap())
        .collect();
    let manifest_at = names.iter().position(|n| n == MANIFEST_FILE).unwrap();
    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("step_00000003");
    std::fs::create_dir(&dir).unwrap();
    let mut m = Mutator::new(2);
    run(
        "fuzz_checkpoint_loader",
        |_| {
            // Input: the index of the damaged file, then its bytes.
            let k = m.below(names.len());
            let mut input = vec![k as u8];
            input.extend(m.mutate(&seeds[k]));
            input.push(u8::from(m.chance(0.7)));
            input
        },
        |input| {
            let k = input[0] as usize;
            let fix_manifest = input[input.len() - 1] == 1;
            let bytes = &input[1..input.len() - 1];
            let mut manifest: serde_json::Value =
                serde_json::from_slice(&seeds[manifest_at]).unwrap();
            for (i, name) in names.iter().enumerate() {
                if i == manifest_at {
                    continue;
                }
                let content = if i == k { bytes } else { &seeds[i][..] };
                std::fs::write(dir.join(name), content).unwrap();
                if i == k && fix_manifest {
                    manifest["files"][name] =
                        json!({ "bytes": content.len(), "crc32": crc32fast::hash(content) });
                }
            }
            let manifest_bytes = if k == manifest_at {
                bytes.to_vec()
            } else {
                serde_json::to_vec(&manifest).unwrap()
            };
            std::fs::write(dir.join(MANIFEST_FILE), manifest_bytes).unwrap();
            match load(&dir) {
                Ok(c) => c.weights.len() + c.optimizer.len() > 0,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    false
                }
            }
        },
    );
}

#[test]
fn fuzz_config_parser() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/tiny.yaml");
    let seed = std::fs::read(&file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("tiny.yaml");
    std::fs::write(&copy, &seed).unwrap();
    let overrides = [
        "train.lr=3e-4",
        "model.num_layers=2",
        "sparsity.l1_coeff=0.5",
        "train.batch_size=4",
        "parallel.tensor=2",
        "sparsity.ffn_path=hybrid",
        "data.train=/nowhere",
        "model.hidden_size=[1, 2]",
    ];
    let mut m = Mutator::new(3);
    run(
        "fuzz_config_parser",
        |_| {
            // Input: 0 then a mutated config, or 1 then a mutated override on the seed config.
            if m.chance(0.6) {
                let mut v = vec![0];
                v.extend(m.mutate(&seed));
                v
            } else {
                let o = overrides[m.below(overrides.len())].as_bytes();
                let mut v = vec![1];
                v.extend(m.mutate(o));
                v
            }
        },
        |input| {
            let text = String::from_utf8_lossy(&input[1..]).into_owned();
            let result = if input[0] == 0 {
                Config::parse(&text, Path::new("fuzz.yaml"))
            } else {
                Config::load_with_overrides(&copy, &[text])
            };
            match result {
                Ok(_) => true,
                Err(e) => {
                    assert!(e.to_string().contains(".yaml"), "no file named: {e}");
                    false
                }
            }
        },
    );
}

#[test]
fn fuzz_tokenizer_loader() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    let words = "the quick brown fox jumps over the lazy dog; sparse models train fast. ";
    std::fs::write(&text, words.repeat(200)).unwrap();
    let opts = BpeOptions {
        vocab_size: 300,
        min_frequency: 2,
        show_progress: false,
    };
    let tok = train_bpe(&[text], &opts).unwrap();
    let seed = tok.json().to_vec();
    let mut m = Mutator::new(4);
    run(
        "fuzz_tokenizer_loader",
        |_| m.mutate(&seed),
        |input| match Tokenizer::from_json("fuzz.json", input.to_vec(), None) {
            Ok(t) => {
                // An accepted tokenizer encodes and decodes without failing hard.
                if let Ok(ids) = t.encode("the quick brown fox") {
                    let _ = t.decode(&ids);
                }
                true
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                false
            }
        },
    );
}
