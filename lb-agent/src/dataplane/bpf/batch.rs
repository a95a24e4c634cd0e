//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6): many entries of one map in one
//! system call, which a cold start of 10 000 Services (some 220 000 entries) needs. aya has no
//! wrapper for them yet, so they are the raw `bpf(2)` commands here, on the fd aya opened.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h). The kernel takes a shorter
/// attr than its own and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: how many entries; out: how many were processed.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A batch stopped at entry `done` (the ones before it were made) with `error`.
#[derive(Debug)]
pub struct Stopped {
    pub done: usize,
    pub error: io::Error,
}

/// Writes `keys[i]` → `values[i]` for every `i`, in order, stopping at the first failure.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), Stopped> {
    assert_eq!(keys.len(), values.len());
    run(BPF_MAP_UPDATE_BATCH, map, keys, Some(values))
}

/// Deletes `keys`, in order, stopping at the first failure (a missing key is one: `ENOENT`).
pub fn delete<K: Pod>(map: &MapData, keys: &[K]) -> Result<(), Stopped> {
    run::<K, u8>(BPF_MAP_DELETE_BATCH, map, keys, None)
}

fn run<K: Pod, V: Pod>(
    command: libc::c_long,
    map: &MapData,
    keys: &[K],
    values: Option<&[V]>,
) -> Result<(), Stopped> {
    let mut done = 0;
    while done < keys.len() {
        // Keys and values are arrays of the map's key and value types: their size is the
        // map's, which aya checked when it typed the map.
        let rest = &keys[done..];
        let count = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            values: values.map_or(0, |v| v[done..].as_ptr() as u64),
            count,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points at key and value arrays of `count` entries that outlive the call;
        // the kernel reads them and writes only attr.count.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        if result == 0 {
            done += count as usize;
            continue;
        }
        let error = io::Error::last_os_error();
        // On failure attr.count says how many entries were processed before the one that failed.
        return Err(Stopped {
            done: done + attr.count as usize,
            error,
        });
    }
    Ok(())
}
