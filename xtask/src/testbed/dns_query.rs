//! A raw DNS client on an unconnected UDP socket (`xtask dns-query`): one `sendto` of an A or
//! AAAA query and one `recvfrom`, reporting where the answer came from and what it holds. Unlike
//! a library resolver it accepts an answer from any source, so a test can see the source lb shows.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, clap::Args)]
pub struct DnsQueryArgs {
    /// The DNS server (a ClusterIP:53, say).
    #[arg(long)]
    pub server: SocketAddr,
    /// A fully qualified name (no search path is applied).
    #[arg(long)]
    pub name: String,
    /// Ask for AAAA records instead of A.
    #[arg(long)]
    pub aaaa: bool,
}

/// What `xtask dns-query` prints, as one JSON line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DnsAnswer {
    /// The source address of the answer, as recvfrom() reported it.
    pub from: String,
    pub addresses: Vec<IpAddr>,
}

const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

pub fn run(args: &DnsQueryArgs) -> anyhow::Result<()> {
    let answer = query(args.server, &args.name, args.aaaa)?;
    println!("{}", serde_json::to_string(&answer)?);
    Ok(())
}

fn query(server: SocketAddr, name: &str, aaaa: bool) -> anyhow::Result<DnsAnswer> {
    let qtype = if aaaa { TYPE_AAAA } else { TYPE_A };
    let id = (std::process::id() & 0xffff) as u16;
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    socket
        .send_to(&encode(id, name, qtype)?, server)
        .with_context(|| format!("sendto {server}"))?;
    let mut buf = [0u8; 1500];
    let (len, from) = socket.recv_from(&mut buf).context("no answer within 2 s")?;
    let addresses = decode(&buf[..len], id, qtype)?;
    Ok(DnsAnswer {
        from: from.to_string(),
        addresses,
    })
}

/// A query with recursion desired, for one name and type.
fn encode(id: u16, name: &str, qtype: u16) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        ensure!(
            !label.is_empty() && label.len() < 64,
            "bad label in {name:?}"
        );
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // class IN
    Ok(out)
}

/// The addresses of the answer's records of `qtype`.
fn decode(msg: &[u8], id: u16, qtype: u16) -> anyhow::Result<Vec<IpAddr>> {
    let u16_at = |i: usize| -> anyhow::Result<u16> {
        let b = msg.get(i..i + 2).context("truncated answer")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    ensure!(u16_at(0)? == id, "answer to another query");
    let rcode = u16_at(2)? & 0xf;
    ensure!(rcode == 0, "the server answered with rcode {rcode}");
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(msg, at)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..answers {
        at = skip_name(msg, at)?;
        let (rtype, rdlen) = (u16_at(at)?, usize::from(u16_at(at + 8)?));
        let rdata = msg
            .get(at + 10..at + 10 + rdlen)
            .context("truncated record")?;
        match (rtype == qtype, rdata.len()) {
            (true, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(rdata)?)),
            (true, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(rdata)?)),
            _ => {} // a CNAME or another type
        }
        at += 10 + rdlen;
    }
    Ok(out)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> anyhow::Result<usize> {
    for _ in 0..128 {
        let len = *msg.get(at).context("truncated name")?;
        match len {
            0 => return Ok(at + 1),
            l if l & 0xc0 == 0xc0 => return Ok(at + 2), // a pointer ends the name
            l => at += 1 + usize::from(l),
        }
    }
    bail!("name too long")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_an_answer_with_a_compressed_name() {
        let mut msg = encode(7, "web.demo.svc.cluster.local", TYPE_A).unwrap();
        msg[2] = 0x81; // a response
        msg[7] = 1; // one answer
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 10, 96, 0, 10]);
        assert_eq!(
            decode(&msg, 7, TYPE_A).unwrap(),
            [IpAddr::from([10, 96, 0, 10])]
        );
        assert!(decode(&msg, 8, TYPE_A).is_err(), "another query's id");
    }
}
