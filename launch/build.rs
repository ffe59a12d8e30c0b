//! Links libtorch_cuda explicitly into this crate's examples and tests (the linker's
//! --as-needed would otherwise drop it and CUDA would report unavailable on a GPU machine,
//! leaving the NCCL path untested) and sets an rpath to the torch libraries: the directory
//! torch-sys built against, which its build script hands to dependents.
fn main() {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys reports its libtorch directory (DEP_TCH_LIBTORCH_LIB)");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,-ltorch,--as-needed");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
