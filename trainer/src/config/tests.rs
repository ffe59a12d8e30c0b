//! Unit tests of the config: parsing, defaults, overrides and the errors that name their field.
use super::*;

const BASE: &str = "model: {vocab_size: 64, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, max_seq_len: 16}\ntrain: {batch_size: 4, micro_batch_size: 2, seq_len: 16}\ndata: {synthetic: true}\n";

fn err(text: &str) -> String {
    Config::parse(text, Path::new("cfg.yaml"))
        .unwrap_err()
        .to_string()
}

#[test]
fn base_config_parses_with_defaults() {
    let c = Config::parse(BASE, Path::new("cfg.yaml")).unwrap();
    assert_eq!(c.model.kv_heads(), 4);
    assert_eq!(c.train.lr, 1e-3);
    assert_eq!(c.sparsity.ffn_path, "dense");
}

#[test]
fn unknown_field_is_named_with_the_file() {
    let e = err(&BASE.replace("max_seq_len: 16}", "max_seq_len: 16, hiden: 3}"));
    assert!(e.contains("cfg.yaml") && e.contains("hiden"), "{e}");
}

#[test]
fn wrong_type_is_named() {
    let e = err(&BASE.replace("num_layers: 2", "num_layers: two"));
    assert!(e.contains("cfg.yaml") && e.contains("num_layers"), "{e}");
}

#[test]
fn missing_required_field_is_named() {
    let e = err(&BASE.replace("num_heads: 4, ", ""));
    assert!(e.contains("num_heads"), "{e}");
}

#[test]
fn invalid_values_name_their_field() {
    let cases = [
        (
            BASE.replace("hidden_size: 32", "hidden_size: 30"),
            "model.hidden_size",
        ),
        (
            BASE.replace("size: 2, seq_len: 16}", "size: 2, seq_len: 32}"),
            "train.seq_len",
        ),
        (
            BASE.replace("micro_batch_size: 2", "micro_batch_size: 3"),
            "train.batch_size",
        ),
        (
            BASE.replace("num_layers: 2", "num_layers: 0"),
            "model.num_layers",
        ),
        (
            format!("{BASE}sparsity: {{ffn_path: sparse}}\n"),
            "sparsity.ffn_path",
        ),
        (
            format!("{BASE}sparsity: {{l1_coeff: -1.0}}\n"),
            "sparsity.l1_coeff",
        ),
        (
            format!("{BASE}sparsity: {{l1_start_step: 5, l1_end_step: 2}}\n"),
            "sparsity.l1_end_step",
        ),
        (
            format!("{BASE}sparsity: {{l1_layer_weights: [1.0, 1.0, 1.0]}}\n"),
            "sparsity.l1_layer_weights",
        ),
        (
            format!("{BASE}sparsity: {{l1_layer_weights: [1.0, -0.5]}}\n"),
            "sparsity.l1_layer_weights",
        ),
        (
            format!("{BASE}parallel: {{tensor: 3}}\n"),
            "parallel.tensor",
        ),
        (
            format!("{BASE}parallel: {{tensor: 2}}\nsparsity: {{repack_every: 10}}\n"),
            "sparsity.repack_every",
        ),
        (
            format!("{BASE}parallel: {{tensor: 2}}\nsparsity: {{reinit_dead: true}}\n"),
            "sparsity.reinit_dead",
        ),
        (
            BASE.replace("data: {synthetic: true}", "data: {}"),
            "data.train",
        ),
        (
            BASE.replace("size: 2, seq_len: 16}", "size: 2, seq_len: 16, lr: 0.0}"),
            "train.lr",
        ),
        (
            BASE.replace(
                "size: 2, seq_len: 16}",
                "size: 2, seq_len: 16, precision: fp16}",
            ),
            "precision",
        ),
        (
            BASE.replace(
                "size: 2, seq_len: 16}",
                "size: 2, seq_len: 16, recompute: attention}",
            ),
            "train.recompute",
        ),
        (
            BASE.replace(
                "size: 2, seq_len: 16}",
                "size: 2, seq_len: 16, device: cpu, cuda_graph: true}",
            ),
            "train.cuda_graph",
        ),
        (
            BASE.replace(
                "size: 2, seq_len: 16}",
                "size: 2, seq_len: 16, cuda_graph: true}\nparallel: {tensor: 2}",
            ),
            "train.cuda_graph",
        ),
    ];
    for (text, field) in cases {
        let e = err(&text);
        assert!(
            e.contains("cfg.yaml") && e.contains(field),
            "expected `{field}` in: {e}"
        );
    }
}

#[test]
fn overrides_apply_and_are_validated() {
    let c = Config::parse_with_overrides(
        BASE,
        Path::new("cfg.yaml"),
        &[
            "train.batch_size=8".into(),
            "sparsity.ffn_path=hybrid".into(),
        ],
    )
    .unwrap();
    assert_eq!(c.train.batch_size, 8);
    assert_eq!(c.sparsity.ffn_path, "hybrid");
    let e =
        Config::parse_with_overrides(BASE, Path::new("cfg.yaml"), &["train.batch_size=3".into()])
            .unwrap_err()
            .to_string();
    assert!(e.contains("train.batch_size"), "{e}");
    let e = Config::parse_with_overrides(BASE, Path::new("cfg.yaml"), &["train.bach=3".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("bach"), "{e}");
}

/// `none` by default; each value parses, from the file and from `--set`; a bad value through
/// `--set` (an untyped tree, where serde keeps no field path) still names the field.
#[test]
fn recompute_parses_and_bad_values_name_the_field() {
    let c = Config::parse(BASE, Path::new("cfg.yaml")).unwrap();
    assert_eq!(c.train.recompute, Recompute::None);
    for (value, want) in [
        ("none", Recompute::None),
        ("ffn", Recompute::Ffn),
        ("full", Recompute::Full),
    ] {
        let text = BASE.replace(
            "size: 2, seq_len: 16}",
            &format!("size: 2, seq_len: 16, recompute: {value}}}"),
        );
        let c = Config::parse(&text, Path::new("cfg.yaml")).unwrap();
        assert_eq!(c.train.recompute, want);
        let c = Config::parse_with_overrides(
            BASE,
            Path::new("cfg.yaml"),
            &[format!("train.recompute={value}")],
        )
        .unwrap();
        assert_eq!(c.train.recompute, want);
        assert_eq!(c.train.recompute.name(), value);
    }
    let e =
        Config::parse_with_overrides(BASE, Path::new("cfg.yaml"), &["train.recompute=ffm".into()])
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("cfg.yaml") && e.contains("train.recompute") && e.contains("ffm"),
        "{e}"
    );
}

#[test]
fn missing_file_is_named() {
    let e = Config::load(Path::new("/nonexistent/x.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/x.yaml"), "{e}");
}

#[test]
fn shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 6, "expected the six shipped configs, found {n}");
}

#[test]
fn overrides_on_a_loaded_config_apply_and_revalidate() {
    let c = Config::parse(BASE, Path::new("cfg.yaml")).unwrap();
    let origin = Path::new("ckpt/step-10");
    let d = c
        .with_overrides(&["train.micro_batch_size=4".into()], origin)
        .unwrap();
    assert_eq!(d.train.micro_batch_size, 4);
    assert_eq!(d.model, c.model);
    let e = c
        .with_overrides(&["train.micro_batch_size=3".into()], origin)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ckpt/step-10") && e.contains("micro_batch_size"),
        "{e}"
    );
    let e = c
        .with_overrides(&["train.nope=1".into()], origin)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--set train.nope=1") || e.contains("nope"),
        "{e}"
    );
}
