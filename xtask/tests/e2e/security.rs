//! What the agent exposes on a node: its pins are root's alone (mode 0600), and it listens on
//! its health and metrics address and on nothing else.

use std::{collections::BTreeSet, fs, os::unix::fs::PermissionsExt as _, path::Path};

use anyhow::{Context as _, ensure};
use xtask::testbed::PodSpec;

use super::{HTTP, testbed, web_manifest};

/// Every pin under `dir`, recursively, with its mode.
fn pins(dir: &Path, out: &mut Vec<(String, u32)>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            pins(&entry.path(), out)?;
        } else {
            out.push((
                entry.path().display().to_string(),
                meta.permissions().mode() & 0o777,
            ));
        }
    }
    Ok(())
}

/// The inodes of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = fs::read_link(fd?.path()) else {
            continue; // closed meanwhile
        };
        let target = target.display().to_string();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
        {
            out.insert(inode.to_owned());
        }
    }
    Ok(out)
}

/// The local addresses (as /proc/net writes them) of `pid`'s sockets in table `table` (`tcp`,
/// `udp`, ...) of its network namespace, keeping those whose state is `state` when given
/// (`0A`: listening).
fn bound(pid: u32, table: &str, state: Option<&str>) -> anyhow::Result<Vec<String>> {
    let inodes = socket_inodes(pid)?;
    let text = fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (local, st, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            (inodes.contains(*inode) && state.is_none_or(|s| s == *st)).then(|| local.to_string())
        })
        .collect())
}

pub fn pins_private_and_one_listening_socket() -> anyhow::Result<()> {
    let pods = PodSpec::numbered("web", 2, &[HTTP]);
    let mut tb = testbed(&pods)?;
    tb.write_manifest("web.yaml", &web_manifest(&pods))?;
    tb.start_agent()?;

    let mut found = Vec::new();
    pins(tb.pin_dir(), &mut found)?;
    ensure!(
        found.iter().any(|(p, _)| p.ends_with("LB4_SERVICES"))
            && found.iter().any(|(p, _)| p.ends_with("connect4_link")),
        "the maps and links are not where expected: {found:?}"
    );
    let open: Vec<&(String, u32)> = found.iter().filter(|(_, mode)| *mode != 0o600).collect();
    ensure!(
        open.is_empty(),
        "pins other users may read or write: {open:?}"
    );

    let pid = tb.agent().pid();
    let port = format!("{:04X}", tb.agent().health_addr().port());
    let listening: Vec<String> = ["tcp", "tcp6"]
        .iter()
        .map(|t| bound(pid, t, Some("0A")))
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    ensure!(
        listening.len() == 1 && listening[0].ends_with(&format!(":{port}")),
        "the agent listens on {listening:?}, not only its health address (port {port})"
    );
    let udp: Vec<String> = ["udp", "udp6"]
        .iter()
        .map(|t| bound(pid, t, None))
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    ensure!(udp.is_empty(), "the agent has UDP sockets bound: {udp:?}");
    eprintln!(
        "{} pins, all 0600; the agent listens on its health address only",
        found.len()
    );
    Ok(())
}
