//! Builds the two native parts of the crate:
//! - `bridge/*.cpp`: the C++ side of the custom autograd functions, compiled against the
//!   libtorch headers of the torch venv (see scripts/env.sh).
//! - `cuda/*.cu`: CUDA kernels compiled ahead of time into cubins (sm_90a, sm_80) and PTX
//!   (compute_80) when the pinned nvcc is present; the paths are exported to the crate at
//!   compile time (`cubins.txt`) and the images themselves embedded (`cubins_embed.rs`,
//!   `include_bytes!`), so a carried binary needs no image files. Without nvcc both are
//!   empty and the crate compiles the embedded sources with NVRTC at first GPU use.
//! - `cuda/common.cuh`'s shared constants (the `#define NAME <integer>` lines between its
//!   `BEGIN SHARED CONSTANTS` and `END SHARED CONSTANTS` markers) as Rust constants
//!   (`kernel_constants.rs`), so Rust launches with the numbers the kernels were built with.
use std::path::{Path, PathBuf};
use std::process::Command;

fn torch_root() -> PathBuf {
    if let Ok(lib) = std::env::var("SPARSE_TRAIN_TORCH_LIB") {
        if !lib.is_empty() {
            return Path::new(&lib).parent().unwrap().to_path_buf();
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import torch,os;print(os.path.dirname(torch.__file__))",
        ])
        .output()
        .expect("python3 with torch is needed to build sparse-kernels (source scripts/env.sh)");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn sources(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == ext));
    v.sort();
    v
}

/// `include/` of the pinned nvcc named by `SPARSE_TRAIN_NVCC`, when present.
fn nvcc_include() -> Option<PathBuf> {
    let nvcc = std::env::var("SPARSE_TRAIN_NVCC").ok()?;
    let inc = Path::new(&nvcc).parent()?.parent()?.join("include");
    inc.exists().then_some(inc)
}

fn build_bridge() {
    let cpp = sources("bridge", "cpp");
    println!("cargo:rerun-if-changed=bridge");
    if cpp.is_empty() {
        return;
    }
    let torch = torch_root();
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        // CUDA runtime headers (for c10/cuda): the venv's NVIDIA wheels and the pinned nvcc's.
        .include(torch.parent().unwrap().join("nvidia/cu13/include"))
        .include(nvcc_include().expect(
            "the pinned nvcc is needed for the CUDA headers: run scripts/setup.sh and source scripts/env.sh",
        ))
        .flag("-w")
        .opt_level(2);
    for f in &cpp {
        b.file(f);
    }
    b.compile("sparse_bridge");
    println!(
        "cargo:rustc-link-search=native={}",
        torch.join("lib").display()
    );
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    // at::cuda::CUDAGraph (bridge/cuda_graph.cpp).
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
}

fn build_cubins() {
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-env-changed=SPARSE_TRAIN_NVCC");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let nvcc = std::env::var("SPARSE_TRAIN_NVCC")
        .ok()
        .filter(|p| Path::new(p).exists());
    let cu = sources("cuda", "cu");
    let mut manifest = String::new();
    let mut embed = String::from(
        "/// Cubins (sm_90a, sm_80) and PTX (compute_80) compiled by build.rs, embedded in the\n\
         /// binary: (stem, arch, bytes).\n\
         pub const EMBEDDED_CUBINS: &[(&str, &str, &[u8])] = &[\n",
    );
    for src in &cu {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        // sm_90a and sm_80 cubins, and compute_80 PTX (JIT-compiled by the driver on any
        // later GPU, and the way to run the sm_80 code path on a Hopper card).
        for (arch, code) in [
            ("compute_90a", "sm_90a"),
            ("compute_80", "sm_80"),
            ("compute_80", "compute_80"),
        ] {
            let ptx = code.starts_with("compute_");
            let cubin = out_dir.join(format!(
                "{stem}.{code}.{}",
                if ptx { "ptx" } else { "cubin" }
            ));
            if let Some(nvcc) = &nvcc {
                let inc = nvcc_include().expect("the pinned nvcc's include/ folder");
                let status = Command::new(nvcc)
                    .arg(if ptx { "-ptx" } else { "-cubin" })
                    .args(["-O3", "-std=c++17", "-lineinfo"])
                    .arg(format!("-gencode=arch={arch},code={code}"))
                    .arg("-I")
                    .arg(&inc)
                    .arg("-I")
                    .arg(inc.join("cccl"))
                    .arg("-o")
                    .arg(&cubin)
                    .arg(src)
                    .status()
                    .expect("failed to run nvcc");
                assert!(
                    status.success(),
                    "nvcc failed on {} for {code}",
                    src.display()
                );
                manifest.push_str(&format!("{stem} {code} {}\n", cubin.display()));
                embed.push_str(&format!(
                    "    ({stem:?}, {code:?}, include_bytes!({:?})),\n",
                    cubin.display().to_string()
                ));
            }
        }
    }
    embed.push_str("];\n");
    std::fs::write(out_dir.join("cubins.txt"), manifest).unwrap();
    std::fs::write(out_dir.join("cubins_embed.rs"), embed).unwrap();
}

/// `pub const NAME: i64 = VALUE;` for every `#define NAME VALUE` between the markers of
/// `cuda/common.cuh`, with the comment lines above each kept as its doc.
fn kernel_constants() {
    const HEADER: &str = "cuda/common.cuh";
    println!("cargo:rerun-if-changed={HEADER}");
    let text = std::fs::read_to_string(HEADER).expect("kernels/cuda/common.cuh");
    let block = text
        .split("// BEGIN SHARED CONSTANTS")
        .nth(1)
        .and_then(|rest| rest.split("// END SHARED CONSTANTS").next())
        .expect("common.cuh: no BEGIN/END SHARED CONSTANTS block");
    let mut out = String::from("// Generated by build.rs from kernels/cuda/common.cuh.\n");
    let mut doc = Vec::new();
    for line in block.lines().map(str::trim) {
        if let Some(comment) = line.strip_prefix("//") {
            // A bare `//` ends a paragraph that documents no constant.
            match comment.trim() {
                "" => doc.clear(),
                text => doc.push(text.to_string()),
            }
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => doc.clear(),
            ["#define", name, value] => {
                let value: i64 = value.parse().unwrap_or_else(|_| {
                    panic!("common.cuh: {name} = {value} is not a decimal integer")
                });
                for d in doc.drain(..) {
                    out.push_str(&format!("/// {d}\n"));
                }
                out.push_str(&format!("pub const {name}: i64 = {value};\n"));
            }
            _ => panic!("common.cuh: unexpected line in the shared constants: `{line}`"),
        }
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(out_dir.join("kernel_constants.rs"), out).unwrap();
}

fn main() {
    build_bridge();
    build_cubins();
    kernel_constants();
}
