//! `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_DELETE_BATCH` (Linux 5.6): many
//! entries of one map in one system call, which a cold start of 10 000 Services (some 220 000
//! entries) and every resync's read of the maps need. aya has no wrapper for them yet, so they are
//! the raw `bpf(2)` commands here, on the fd aya opened.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{Pod, maps::MapData};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
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

/// Entries read per call of [`lookup_all`].
const LOOKUP_CHUNK: usize = 8192;

/// Every entry of a hash map, `LOOKUP_CHUNK` per system call (aya's iterator takes two calls
/// per entry).
pub fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = LOOKUP_CHUNK;
    // The position between calls: a bucket number for hash maps, which the kernel reads and
    // writes as a u32.
    let mut position = 0u64;
    let mut next = 0u64;
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk);
        let mut values: Vec<V> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &position as *const u64 as u64
            },
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: keys and values have room for `count` entries of the map's key and value
        // sizes; the kernel writes at most that many and says how many in attr.count.
        let error = unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match &error {
            // A bucket holds more entries than fit: ask for more at once.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                chunk *= 2;
                continue;
            }
            Some(e) if e.kind() != io::ErrorKind::NotFound => return Err(error.unwrap()),
            _ => {}
        }
        let count = attr.count as usize;
        // SAFETY: the kernel wrote `count` whole entries.
        unsafe {
            keys.set_len(count);
            values.set_len(count);
        }
        out.extend(keys.into_iter().zip(values));
        // ENOENT: that was the last of them.
        if error.is_some() {
            return Ok(out);
        }
        position = next;
        first = false;
    }
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
        let Err(error) = (unsafe { bpf(command, &mut attr) }) else {
            done += count as usize;
            continue;
        };
        // On failure attr.count says how many entries were processed before the one that failed,
        // when the kernel got as far as the entries; an error before them (a bad fd, no
        // permission, and ENOMEM before Linux 6.8) leaves it as we set it: nothing was done.
        let processed = match attr.count {
            n if n < count => n as usize,
            _ => 0,
        };
        return Err(Stopped {
            done: done + processed,
            error,
        });
    }
    Ok(())
}

/// `bpf(command, attr)`.
///
/// # Safety
///
/// The attr's key and value pointers must point at arrays of `attr.count` entries of the map's
/// key and value sizes, valid for the call (writable for a lookup).
unsafe fn bpf(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the caller's promise; the attr itself is a valid batch attr.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>() as u32,
        )
    };
    match result {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
