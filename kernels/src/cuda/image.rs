//! Which compiled image of a kernel file a device loads, and the NVRTC fallback.
//!
//! `build.rs` compiles `kernels/cuda/*.cu` into `$OUT_DIR/<stem>.<arch>.{cubin,ptx}` (sm_90a,
//! sm_80 cubins and compute_80 PTX) when `SPARSE_TRAIN_NVCC` is set, and embeds them in the
//! binary. At run time `$SPARSE_TRAIN_CUBINS/<stem>.<arch>.<ext>` wins when present (to try a
//! new image without a rebuild), then the embedded image, then the paths build.rs recorded.
//! `SPARSE_TRAIN_KERNEL_IMAGE` picks the image ([`load_image`]); under the default `auto`, a
//! missing image falls back to NVRTC on the embedded sources (`common.cuh` put in place of
//! its `#include`), so a binary built without nvcc still runs the kernels.
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};

use super::{CudaKernelError, Result};

/// Manifest written by build.rs: `stem arch path` per line (empty without nvcc).
const CUBIN_MANIFEST: &str = include_str!(concat!(env!("OUT_DIR"), "/cubins.txt"));
include!(concat!(env!("OUT_DIR"), "/cubins_embed.rs"));

/// The header every kernel file includes, and the line that includes it.
const COMMON_HEADER: &str = include_str!("../../cuda/common.cuh");
const COMMON_INCLUDE: &str = "#include \"common.cuh\"";

fn image_extension(arch: &str) -> &'static str {
    if arch.starts_with("compute_") {
        "ptx"
    } else {
        "cubin"
    }
}

/// The bytes of image `<stem>.<arch>` (cubin, or PTX text for a `compute_` arch), from the
/// first place that has it (see the module docs).
fn image_bytes(stem: &str, arch: &str) -> Result<Vec<u8>> {
    let file = format!("{stem}.{arch}.{}", image_extension(arch));
    if let Ok(dir) = std::env::var("SPARSE_TRAIN_CUBINS") {
        let path = PathBuf::from(dir).join(&file);
        if path.exists() {
            return std::fs::read(&path).map_err(|source| CudaKernelError::Io { path, source });
        }
    }
    if let Some((_, _, bytes)) = EMBEDDED_CUBINS
        .iter()
        .find(|(s, a, _)| *s == stem && *a == arch)
    {
        return Ok(bytes.to_vec());
    }
    for line in CUBIN_MANIFEST.lines() {
        let mut it = line.splitn(3, ' ');
        if let (Some(s), Some(a), Some(p)) = (it.next(), it.next(), it.next()) {
            let path = PathBuf::from(p);
            if s == stem && a == arch && path.exists() {
                return std::fs::read(&path).map_err(|source| CudaKernelError::Io { path, source });
            }
        }
    }
    Err(CudaKernelError::MissingImage { file })
}

/// Whether this binary carries compiled cubins (false: built without nvcc).
pub fn has_embedded_cubins() -> bool {
    !EMBEDDED_CUBINS.is_empty()
}

/// The kernel files, for run-time compilation with NVRTC.
pub const KERNEL_FILES: [(&str, &str); 8] = [
    ("twell", include_str!("../../cuda/twell.cu")),
    ("hybrid", include_str!("../../cuda/hybrid.cu")),
    ("rope", include_str!("../../cuda/rope.cu")),
    ("norm", include_str!("../../cuda/norm.cu")),
    ("attention", include_str!("../../cuda/attention.cu")),
    ("cross_entropy", include_str!("../../cuda/cross_entropy.cu")),
    ("gating", include_str!("../../cuda/gating.cu")),
    ("decode", include_str!("../../cuda/decode.cu")),
];

/// Kernel file `stem` as NVRTC compiles it: `common.cuh` in place of its `#include` line
/// (a carried binary has no header files to find).
pub fn nvrtc_source(stem: &str) -> Result<String> {
    let src = KERNEL_FILES
        .iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, src)| *src)
        .ok_or_else(|| CudaKernelError::Image(format!("no source for kernel file {stem}")))?;
    if src.matches(COMMON_INCLUDE).count() != 1 {
        return Err(CudaKernelError::Image(format!(
            "{stem}.cu must include common.cuh exactly once"
        )));
    }
    Ok(src.replacen(COMMON_INCLUDE, COMMON_HEADER, 1))
}

/// How a kernel file was loaded: the image's name and whether it holds the sm_90a (wgmma)
/// kernels.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    pub image: String,
    pub wgmma: bool,
}

/// CUDA include folders for NVRTC: `SPARSE_TRAIN_CUDA_INCLUDE`, the pinned nvcc's, the
/// `include/` beside each library folder on `LD_LIBRARY_PATH` (the NVIDIA wheels'
/// `nvidia/cu13/lib` -> `nvidia/cu13/include`), `$CUDA_HOME/include`, /usr/local/cuda.
pub(super) fn cuda_include_dirs() -> Vec<String> {
    let mut v: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("SPARSE_TRAIN_CUDA_INCLUDE") {
        v.push(p.into());
    }
    if let Ok(nvcc) = std::env::var("SPARSE_TRAIN_NVCC") {
        if let Some(root) = std::path::Path::new(&nvcc)
            .parent()
            .and_then(|b| b.parent())
        {
            v.push(root.join("include"));
        }
    }
    if let Ok(paths) = std::env::var("LD_LIBRARY_PATH") {
        for lib in std::env::split_paths(&paths) {
            if let Some(parent) = lib.parent() {
                v.push(parent.join("include"));
            }
        }
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(home).join("include"));
    }
    v.push("/usr/local/cuda/include".into());
    v.into_iter()
        .filter(|p| p.join("cuda_bf16.h").exists())
        .map(|p| p.display().to_string())
        .collect()
}

/// Loads kernel file `stem` into `ctx`. `SPARSE_TRAIN_KERNEL_IMAGE` picks the image:
/// `auto` (default: the sm_90a cubin on compute capability 9.0, the sm_80 cubin on 8.x, the
/// compute_80 PTX, JIT-compiled by the driver, on anything else; NVRTC from the embedded
/// source when that image is missing), or one of `sm_90a`, `sm_80`, `compute_80`, `nvrtc`
/// (no fallback; `compute_80` runs the non-Hopper code path on a Hopper card).
pub(super) fn load_image(
    ctx: &Arc<CudaContext>,
    stem: &str,
) -> Result<(Arc<CudaModule>, LoadedImage)> {
    let (major, minor) = ctx.compute_capability()?;
    let choice = std::env::var("SPARSE_TRAIN_KERNEL_IMAGE").unwrap_or_else(|_| "auto".into());
    let hopper = (major, minor) == (9, 0);
    let (image, fallback) = match choice.as_str() {
        "auto" if hopper => ("sm_90a", true),
        "auto" if major == 8 => ("sm_80", true),
        "auto" => ("compute_80", true),
        "sm_90a" | "sm_80" | "compute_80" | "nvrtc" => (choice.as_str(), false),
        other => {
            return Err(CudaKernelError::Image(format!(
            "SPARSE_TRAIN_KERNEL_IMAGE={other}: expected auto, sm_90a, sm_80, compute_80 or nvrtc"
        )))
        }
    };
    if image != "nvrtc" {
        match image_bytes(stem, image) {
            Ok(bytes) => {
                let ptx = if image.starts_with("compute_") {
                    cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(&bytes).into_owned())
                } else {
                    cudarc::nvrtc::Ptx::from_binary(bytes)
                };
                let loaded = LoadedImage {
                    image: image.into(),
                    wgmma: image == "sm_90a",
                };
                return Ok((ctx.load_module(ptx)?, loaded));
            }
            Err(e) if !fallback => return Err(e),
            Err(_) => {}
        }
    }
    let arch = if hopper {
        "compute_90a".to_string()
    } else {
        format!("compute_{major}{minor}")
    };
    let ptx = nvrtc_compile(stem, &arch)?;
    let loaded = LoadedImage {
        image: format!("nvrtc {arch}"),
        wgmma: hopper,
    };
    Ok((ctx.load_module(ptx)?, loaded))
}

/// Compiles kernel file `stem` (one of [`KERNEL_FILES`]) from its embedded source ([`nvrtc_source`]) with NVRTC for
/// `arch` (e.g. `compute_90a`), finding the CUDA headers as [`cuda_include_dirs`] does.
/// Needs libnvrtc, not a GPU.
pub fn nvrtc_compile(stem: &str, arch: &str) -> Result<cudarc::nvrtc::Ptx> {
    let src = nvrtc_source(stem)?;
    let include_paths = cuda_include_dirs();
    if include_paths.is_empty() {
        return Err(CudaKernelError::Image(format!(
            "NVRTC for {stem}.cu needs the CUDA headers (cuda_bf16.h): set SPARSE_TRAIN_CUDA_INCLUDE"
        )));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        include_paths,
        options: vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".into(),
            "-default-device".into(),
        ],
        ..Default::default()
    };
    // SAFETY: only tries to open the library (cudarc panics on use when it is absent).
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(CudaKernelError::Image(
            "libnvrtc could not be loaded (put the CUDA libraries on LD_LIBRARY_PATH)".into(),
        ));
    }
    cudarc::nvrtc::compile_ptx_with_opts(src, opts)
        .map_err(|e| CudaKernelError::Image(format!("NVRTC on {stem}.cu for {arch}: {e:?}")))
}

/// `(stem, arch, PTX)` of every kernel file under the Hopper and the Ampere architecture
/// through NVRTC, for tests on machines without a GPU: `None` (with the reason printed)
/// where the CUDA headers or libnvrtc are missing.
#[cfg(test)]
pub(super) fn every_nvrtc_ptx_for_test() -> Option<Vec<(&'static str, &'static str, String)>> {
    let mut out = Vec::new();
    for (stem, _) in KERNEL_FILES {
        for arch in ["compute_90a", "compute_80"] {
            out.push((stem, arch, nvrtc_ptx_for_test(stem, arch)?));
        }
    }
    Some(out)
}

#[cfg(test)]
fn nvrtc_ptx_for_test(stem: &str, arch: &str) -> Option<String> {
    if cuda_include_dirs().is_empty() {
        println!("skipped: no CUDA headers found (source scripts/env.sh)");
        return None;
    }
    match nvrtc_compile(stem, arch) {
        Ok(ptx) => Some(ptx.to_src()),
        Err(CudaKernelError::Image(e)) if e.contains("libnvrtc could not") => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("{stem} for {arch}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sources also compile at run time (NVRTC, no GPU needed), for Hopper and Ampere:
    /// the fallback of a binary built without nvcc or run on a GPU it has no image for.
    #[test]
    fn kernel_sources_compile_with_nvrtc() {
        let Some(images) = every_nvrtc_ptx_for_test() else {
            return;
        };
        for (stem, arch, text) in images {
            assert!(
                text.contains(".entry"),
                "{stem} {arch}: no kernels in the PTX"
            );
            // The Hopper build holds the wgmma gate, the Ampere one must not.
            assert_eq!(
                text.contains("wgmma.mma_async"),
                arch == "compute_90a" && stem == "twell",
                "{stem} {arch}: wgmma presence"
            );
        }
    }

    #[test]
    fn nvrtc_source_inlines_the_common_header() {
        for (stem, src) in KERNEL_FILES {
            let text = nvrtc_source(stem).unwrap();
            assert!(!text.contains(COMMON_INCLUDE), "{stem}: include left");
            assert!(text.contains("BEGIN SHARED CONSTANTS"), "{stem}: no header");
            assert_eq!(
                text.len(),
                src.len() - COMMON_INCLUDE.len() + COMMON_HEADER.len()
            );
        }
    }
}
