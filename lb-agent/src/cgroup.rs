//! Finding the cgroup v2 hierarchy to attach to.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// The mount point of the cgroup v2 filesystem: `/sys/fs/cgroup` on a unified host, often
/// `/sys/fs/cgroup/unified` on a hybrid one. Any cgroup2 mount shows the same hierarchy.
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mounts = cgroup2_mounts(&mountinfo);
    if let Some(preferred) = mounts.iter().find(|m| m.as_os_str() == "/sys/fs/cgroup") {
        return Ok(preferred.clone());
    }
    match mounts.into_iter().next() {
        Some(mount) => Ok(mount),
        None => bail!(
            "no cgroup v2 filesystem is mounted; mount one (`mount -t cgroup2 none /sys/fs/cgroup`) \
             or pass --cgroup with a cgroup v2 directory"
        ),
    }
}

/// Mount points of `cgroup2` filesystems in a mountinfo text (proc(5)).
fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|c| u8::from_str_radix(c, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mounts_in_mountinfo() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw
33 31 0:28 / /sys/fs/cgroup/cpu rw shared:11 - cgroup cgroup rw,cpu
40 25 0:30 / /mnt/with\\040space rw - cgroup2 none rw";
        assert_eq!(
            cgroup2_mounts(hybrid),
            [
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/mnt/with space")
            ]
        );
        assert!(cgroup2_mounts("25 30 0:23 / /sys rw - sysfs sysfs rw").is_empty());
    }
}
