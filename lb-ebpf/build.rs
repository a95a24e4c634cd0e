use which::which;

/// Rebuild the eBPF object when bpf-linker changes (it links the object; aya-template does the
/// same). The linker is installed by `xtask/run`.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker not found on PATH: run `xtask/run setup` (see README) to install the toolchain",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
