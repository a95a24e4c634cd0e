use std::path::Path;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Compiles lb-ebpf for the BPF target; the agent embeds the object (`OUT_DIR/lb`).
fn main() -> anyhow::Result<()> {
    let ebpf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-ebpf");
    let ebpf_dir = ebpf_dir
        .canonicalize()
        .with_context(|| format!("lb-ebpf not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().context("lb-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs failed: run `xtask/run setup` to install the toolchain")
}
