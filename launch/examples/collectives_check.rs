//! Checks every collective against values computed by hand, on however many ranks it is
//! started with. Run by `launch/tests/mpirun.rs` on CPU; on a GPU machine it exercises NCCL:
//!
//! ```text
//! mpirun --allow-run-as-root --oversubscribe -n 3 target/release/examples/collectives_check --cpu
//! mpirun -n 1 target/release/examples/collectives_check          # cuda:0, NCCL
//! ```
//!
//! Failure drills (each must end the whole job non-zero, naming the rank):
//! `--fail-rank R` (rank R returns an error before the first collective), `--panic-rank R`,
//! `--mismatch-rank R` (rank R reports a different config hash), `--skip-finish-rank R`
//! (rank R leaves `main` without `World::finish` while the others wait in its barrier).

use anyhow::{bail, ensure, Context, Result};
use sparse_launch::{fail_fast, stable_hash, Collective, World, WorldOptions};
use tch::{Device, Kind, Tensor};

/// Command-line flags.
#[derive(Default)]
struct Args {
    cpu: bool,
    fail_rank: Option<usize>,
    panic_rank: Option<usize>,
    mismatch_rank: Option<usize>,
    skip_finish_rank: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut rank = || -> Result<Option<usize>> {
            let v = it.next().with_context(|| format!("{flag} needs a rank"))?;
            Ok(Some(v.parse().with_context(|| format!("{flag} {v}"))?))
        };
        match flag.as_str() {
            "--cpu" => args.cpu = true,
            "--fail-rank" => args.fail_rank = rank()?,
            "--panic-rank" => args.panic_rank = rank()?,
            "--mismatch-rank" => args.mismatch_rank = rank()?,
            "--skip-finish-rank" => args.skip_finish_rank = rank()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(args)
}

/// Bytes per bucket: small, so `all_reduce_sum_many` packs several buckets and meets a
/// tensor larger than one bucket.
const BUCKET_BYTES: usize = 64;

fn main() {
    let args = fail_fast(parse_args());
    let world = fail_fast(World::init(&WorldOptions {
        cpu_only: args.cpu,
        bucket_bytes: BUCKET_BYTES,
    }));
    if args.fail_rank == Some(world.rank()) {
        world.fail_fast(Err::<(), _>(anyhow::anyhow!(
            "simulated start-up failure (config not found)"
        )));
    }
    if args.panic_rank == Some(world.rank()) {
        panic!("simulated panic before the first collective");
    }
    let config_hash = if args.mismatch_rank == Some(world.rank()) {
        stable_hash(b"lr: 3e-3")
    } else {
        stable_hash(b"lr: 3e-4")
    };
    world.fail_fast(
        world
            .collective()
            .check_same_on_all_ranks("config", config_hash),
    );
    world.fail_fast(check_all(&world));
    println!(
        "rank {}/{}: all collectives ok on {:?} ({})",
        world.rank(),
        world.size(),
        world.device(),
        world.backend()
    );
    if args.skip_finish_rank == Some(world.rank()) {
        return;
    }
    world.finish();
}

/// Fails unless `got` equals `want` exactly (compared in f64 on the CPU; every expected
/// value here is a small integer, exact in bf16 too).
fn expect(label: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    let want = want.to_device(Device::Cpu).to_kind(Kind::Double);
    ensure!(
        got.size() == want.size(),
        "{label}: shape {:?}, want {:?}",
        got.size(),
        want.size()
    );
    ensure!(
        got.equal(&want),
        "{label}: got {:?}, want {:?}",
        Vec::<f64>::try_from(got.reshape([-1]))?,
        Vec::<f64>::try_from(want.reshape([-1]))?
    );
    Ok(())
}

fn check_all(world: &World) -> Result<()> {
    let c = world.collective();
    let dev = world.device();
    let (n, r) = (world.size() as i64, world.rank() as i64);
    let tri = (n * (n + 1) / 2) as f64; // sum of (rank + 1) over ranks

    // all_reduce_sum, several kinds, and a non-contiguous tensor.
    for kind in [Kind::Float, Kind::Double, Kind::Int64, Kind::BFloat16] {
        let mut t = Tensor::full([5], r + 1, (kind, dev));
        c.all_reduce_sum(&mut t)?;
        expect(
            &format!("all_reduce_sum {kind:?}"),
            &t,
            &Tensor::full([5], tri, (Kind::Double, Device::Cpu)),
        )?;
    }
    let base = Tensor::arange(6, (Kind::Float, dev)).reshape([2, 3]);
    let mut transposed = (&base * (r + 1) as f64).tr();
    c.all_reduce_sum(&mut transposed)?;
    expect(
        "all_reduce_sum non-contiguous",
        &transposed,
        &(base.tr() * tri),
    )?;

    // all_reduce_sum_many: buckets of 64 bytes, mixed kinds, one tensor above a bucket.
    let shapes: [(&[i64], Kind); 5] = [
        (&[3, 4], Kind::Float),
        (&[2], Kind::Float),
        (&[3], Kind::Int64),
        (&[40], Kind::Float),
        (&[1], Kind::Float),
    ];
    let mut grads: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, (shape, kind))| Tensor::full(*shape, (r + 1) * (i as i64 + 1), (*kind, dev)))
        .collect();
    c.all_reduce_sum_many(&mut grads)?;
    for (i, ((shape, _), g)) in shapes.iter().zip(&grads).enumerate() {
        let want = Tensor::full(*shape, tri * (i + 1) as f64, (Kind::Double, Device::Cpu));
        expect(&format!("all_reduce_sum_many tensor {i}"), g, &want)?;
    }

    // reduce_scatter_sum: input arange(4n) + rank; the sum is n * arange + n(n-1)/2.
    for kind in [Kind::Float, Kind::BFloat16] {
        let input = (Tensor::arange(4 * n, (Kind::Float, dev)) + r as f64).to_kind(kind);
        let mut shard = Tensor::zeros([4], (kind, dev));
        c.reduce_scatter_sum(&input, &mut shard)?;
        let sum = Tensor::arange(4 * n, (Kind::Double, Device::Cpu)) * n as f64
            + (n * (n - 1) / 2) as f64;
        expect(
            &format!("reduce_scatter_sum {kind:?}"),
            &shard,
            &sum.narrow(0, 4 * r, 4),
        )?;
    }

    // all_gather: rank r contributes [r, r, r]; output is rank-major.
    let mine = Tensor::full([3], r, (Kind::Float, dev));
    let mut all = Tensor::zeros([n, 3], (Kind::Float, dev));
    c.all_gather(&mine, &mut all)?;
    let want = Tensor::arange(n, (Kind::Double, Device::Cpu))
        .unsqueeze(1)
        .expand([n, 3], false);
    expect("all_gather", &all, &want)?;

    // broadcast from the last rank.
    let mut b = Tensor::full([4], r, (Kind::Int64, dev));
    c.broadcast(&mut b, (n - 1) as usize)?;
    expect(
        "broadcast",
        &b,
        &Tensor::full([4], n - 1, (Kind::Double, Device::Cpu)),
    )?;

    check_split(c, n, r, dev)?;

    // Host scalars and the stop flag.
    ensure!(
        c.all_reduce_sum_f64(r as f64) == (n * (n - 1) / 2) as f64,
        "all_reduce_sum_f64"
    );
    ensure!(
        c.all_reduce_max_f64(r as f64) == (n - 1) as f64,
        "all_reduce_max_f64"
    );
    ensure!(
        c.any_rank_flag(r == n - 1),
        "any_rank_flag(true on the last rank)"
    );
    ensure!(!c.any_rank_flag(false), "any_rank_flag(false everywhere)");
    c.barrier();
    Ok(())
}

/// Splits by rank parity, ordered by descending world rank, and checks the sub-group's
/// ranks, a sum and a gather within it.
fn check_split(c: &Collective, n: i64, r: i64, dev: Device) -> Result<()> {
    let sub = c.split((r % 2) as usize, (n - r) as usize)?;
    let members: Vec<i64> = (0..n).rev().filter(|q| q % 2 == r % 2).collect();
    ensure!(
        sub.size() == members.len(),
        "split size {} want {}",
        sub.size(),
        members.len()
    );
    let position = members.iter().position(|&q| q == r).unwrap_or(usize::MAX);
    ensure!(
        sub.rank() == position,
        "split rank {} want {position}",
        sub.rank()
    );
    let mut t = Tensor::full([2], r + 1, (Kind::Float, dev));
    sub.all_reduce_sum(&mut t)?;
    let sum: i64 = members.iter().map(|q| q + 1).sum();
    expect(
        "split all_reduce_sum",
        &t,
        &Tensor::full([2], sum, (Kind::Double, Device::Cpu)),
    )?;
    let mut gathered = Tensor::zeros([members.len() as i64], (Kind::Float, dev));
    sub.all_gather(&Tensor::full([1], r, (Kind::Float, dev)), &mut gathered)?;
    expect(
        "split all_gather order",
        &gathered,
        &Tensor::from_slice(&members),
    )
}
