//! Links libtorch_cuda explicitly into this crate's examples and tests (the linker's
//! --as-needed would otherwise drop it and CUDA would report unavailable on a GPU machine,
//! leaving the NCCL path untested) and sets an rpath to the torch libraries.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=SPARSE_TRAIN_TORCH_LIB");
    let lib = std::env::var("SPARSE_TRAIN_TORCH_LIB")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            let out = Command::new("python3")
                .args([
                    "-c",
                    "import torch,os;print(os.path.dirname(torch.__file__)+'/lib')",
                ])
                .output()
                .expect("python3 with torch is needed (source scripts/env.sh)");
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        });
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,-ltorch,--as-needed");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
