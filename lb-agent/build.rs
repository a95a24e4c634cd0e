use std::path::Path;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Compiles lb-ebpf for the BPF target; the agent embeds the object (`OUT_DIR/lb`).
///
/// With `AYA_BUILD_SKIP=1` (for host-only tools such as clippy through rustup, which cannot build
/// for BPF here) an empty object is embedded instead, and the agent refuses to run.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        let out_dir = std::env::var_os("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(Path::new(&out_dir).join("lb"), [])?;
        return Ok(());
    }
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("lb-ebpf not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("lb-ebpf path is not UTF-8")?;
    // The programs and the agent must agree on the maps' layout.
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_LAYOUT_TEST").is_some() {
        &["layout-test"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs failed: run `xtask/run setup` to install the toolchain")
}
