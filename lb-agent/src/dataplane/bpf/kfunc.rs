//! The one kfunc lb-ebpf calls, `bpf_sock_destroy` (Linux 6.5), made loadable: rustc and
//! bpf-linker emit a kfunc call as a call to an undefined symbol, which aya 0.14 cannot resolve
//! (it fails the whole object), so the agent rewrites each such call before loading, as libbpf
//! does: into a kfunc call by the kernel's BTF id of the function, or, on a kernel without it, into
//! `r0 = -EOPNOTSUPP` (the programs that call it are then never loaded).

use anyhow::{Context as _, bail, ensure};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

/// The kfunc the socket iterators call.
pub const SOCK_DESTROY: &str = "bpf_sock_destroy";

/// `call` (BPF_JMP | BPF_CALL).
const CALL: u8 = 0x85;
/// Source register of a call to a function of the object (BPF_PSEUDO_CALL), as emitted.
const PSEUDO_CALL: u8 = 1;
/// Source register of a kfunc call (BPF_PSEUDO_KFUNC_CALL).
const PSEUDO_KFUNC_CALL: u8 = 2;
/// `r0 = imm` (BPF_ALU64 | BPF_MOV | BPF_K).
const MOV_R0: u8 = 0xb7;

/// `elf` with every call to the undefined `kfunc` rewritten: to a kfunc call to vmlinux BTF type
/// `btf_id`, or to `r0 = -EOPNOTSUPP` without one. Also returns how many calls it rewrote.
pub fn patch_calls(
    elf: &[u8],
    kfunc: &str,
    btf_id: Option<u32>,
) -> anyhow::Result<(Vec<u8>, usize)> {
    let sites = call_sites(elf, kfunc)?;
    let mut out = elf.to_vec();
    for &at in &sites {
        let Some(insn) = out.get_mut(at..at + 8) else {
            bail!("a relocation for {kfunc} points past the end of the eBPF object");
        };
        ensure!(
            insn[0] == CALL && insn[1] >> 4 == PSEUDO_CALL,
            "the relocation for {kfunc} at {at:#x} is not on a call: {insn:02x?}"
        );
        let (code, regs, imm) = match btf_id {
            Some(id) => (CALL, PSEUDO_KFUNC_CALL << 4, id.cast_signed()),
            None => (MOV_R0, 0, -libc::EOPNOTSUPP),
        };
        insn[0] = code;
        insn[1] = regs;
        insn[2..4].copy_from_slice(&0u16.to_le_bytes()); // offset 0: vmlinux's BTF
        insn[4..8].copy_from_slice(&imm.to_le_bytes());
    }
    Ok((out, sites.len()))
}

/// Where in `elf` (file offsets) the relocations against the undefined symbol `kfunc` point:
/// its call instructions.
fn call_sites(elf: &[u8], kfunc: &str) -> anyhow::Result<Vec<usize>> {
    let object = object::File::parse(elf).context("reading the eBPF object")?;
    let mut sites = Vec::new();
    for section in object.sections() {
        let Some((start, _)) = section.file_range() else {
            continue;
        };
        for (offset, relocation) in section.relocations() {
            let RelocationTarget::Symbol(index) = relocation.target() else {
                continue;
            };
            let symbol = object.symbol_by_index(index)?;
            if symbol.name()? == kfunc && symbol.is_undefined() {
                sites.push(usize::try_from(start + offset)?);
            }
        }
    }
    Ok(sites)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::bpf::pins::EBPF_OBJECT;

    /// The instructions at the relocations for `kfunc` in `elf`.
    fn calls(elf: &[u8], kfunc: &str) -> Vec<[u8; 8]> {
        call_sites(elf, kfunc)
            .unwrap()
            .into_iter()
            .map(|at| elf[at..at + 8].try_into().unwrap())
            .collect()
    }

    #[test]
    fn each_call_becomes_a_kfunc_call_or_an_error_return() {
        if EBPF_OBJECT.is_empty() {
            return; // built with AYA_BUILD_SKIP: no object to patch (the e2e tests load the real one)
        }
        let before = calls(EBPF_OBJECT, SOCK_DESTROY);
        assert_eq!(before.len(), 2, "one call in each socket iterator");
        for insn in &before {
            assert_eq!(insn[..2], [CALL, PSEUDO_CALL << 4]);
        }
        let (patched, count) = patch_calls(EBPF_OBJECT, SOCK_DESTROY, Some(65741)).unwrap();
        assert_eq!(count, 2);
        for insn in calls(&patched, SOCK_DESTROY) {
            assert_eq!(insn, [0x85, 0x20, 0, 0, 0xcd, 0x00, 0x01, 0x00]);
        }
        let (patched, _) = patch_calls(EBPF_OBJECT, SOCK_DESTROY, None).unwrap();
        for insn in calls(&patched, SOCK_DESTROY) {
            assert_eq!(insn, [0xb7, 0, 0, 0, 0xa1, 0xff, 0xff, 0xff], "r0 = -95");
        }
        assert_eq!(patched.len(), EBPF_OBJECT.len(), "only instructions change");
    }
}
