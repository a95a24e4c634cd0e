//! Names resolved the way a Pod resolves them: through the kube-dns Service (the manifest in
//! deploy/examples, verbatim) in front of a real DNS server, with glibc's resolver, musl's, and a
//! raw unconnected UDP client, over IPv4 and IPv6, then used to reach a Service by name.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use xtask::{
    manifests::{self, Port},
    testbed::{PodSpec, Resolv, Testbed, clients, dns_query::DnsAnswer},
};

use super::{
    HTTP, WEB_IP,
    sockets::{WEB_IP6, dual_stack},
    testbed,
};

const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const WEB_NAME: &str = "web.demo.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(15);

fn dns_ip6() -> IpAddr {
    "fd00:96::53".parse().unwrap()
}

/// Three web pods behind a dual-stack demo/web, the kube-dns Service of deploy/examples in front
/// of dnsmasq at the address its slices name (10.244.1.53, fd00:244:1::35), and the agent.
fn dns_testbed() -> anyhow::Result<(Vec<PodSpec>, Testbed)> {
    let pods = PodSpec::numbered("web", 3, &[HTTP]);
    let mut tb = testbed(&pods)?;
    let dns_pod = PodSpec::coredns(Ipv4Addr::new(10, 244, 1, 53));
    tb.add_dns_pod(
        &dns_pod,
        &[(WEB_NAME, WEB_IP.into()), (WEB_NAME, WEB_IP6.into())],
    )?;

    let kube_dns = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/kube-dns.yaml");
    tb.write_manifest("kube-dns.yaml", &std::fs::read_to_string(&kube_dns)?)?;
    let web = dual_stack(
        "web",
        (WEB_IP, WEB_IP6),
        Port::tcp("http", 80, "http"),
        &pods,
        &[("http", HTTP, "TCP")],
    );
    tb.write_manifest("web.yaml", &manifests::documents(&web))?;
    tb.start_agent()?;
    Ok((pods, tb))
}

fn stdout(out: &Output, what: &str, tb: &Testbed) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}\ndnsmasq's log:\n{}",
        out.status,
        text,
        String::from_utf8_lossy(&out.stderr),
        tb.dns_log("coredns-1").unwrap_or_default()
    );
    Ok(text)
}

/// The addresses in `getent ahosts` or musl_resolve output.
fn addresses(text: &str) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn resolvers() -> anyhow::Result<()> {
    let (_, tb) = dns_testbed()?;
    let (web4, web6) = (IpAddr::from(WEB_IP), IpAddr::from(WEB_IP6));
    let v4_only = Resolv::pod("demo", &[DNS_IP.into()]);
    let v6_only = Resolv::pod("demo", &[dns_ip6()]);
    let both = Resolv::pod("demo", &[DNS_IP.into(), dns_ip6()]);

    // glibc (connected UDP sockets), each family of the kube-dns Service.
    for (resolv, nameserver) in [(&v4_only, "10.96.0.53"), (&v6_only, "fd00:96::53")] {
        let what = format!("glibc getent ahosts web (nameserver {nameserver})");
        let out = tb.client_command(resolv, "getent", &["ahosts", "web"], TIMEOUT)?;
        let got = addresses(&stdout(&out, &what, &tb)?);
        ensure!(got == [web4, web6], "{what}: {got:?}");
    }

    // musl (unconnected sendto/recvfrom, A and AAAA in parallel): AF_INET with an IPv4
    // nameserver, AF_INET6 with an IPv6 one, and one AF_INET6 socket reaching the IPv4
    // nameserver as ::ffff:10.96.0.53 when both are listed.
    let musl = clients::musl_resolve()?;
    let musl = musl.to_str().context("musl client path")?;
    for (resolv, flags, expected, label) in [
        (&v4_only, "-4", vec![web4], "IPv4 nameserver"),
        (&v6_only, "-6", vec![web6], "IPv6 nameserver"),
        (&both, "", vec![web4, web6], "both nameservers"),
    ] {
        let mut args = vec!["web"];
        if !flags.is_empty() {
            args.insert(0, flags);
        }
        let what = format!("musl getaddrinfo {flags} web ({label})");
        let out = tb.client_command(resolv, musl, &args, TIMEOUT)?;
        let got = addresses(&stdout(&out, &what, &tb)?);
        ensure!(got == expected, "{what}: {got:?}");
    }

    // A raw unconnected UDP client: its answer comes from the ClusterIP it asked.
    let xtask = env!("CARGO_BIN_EXE_xtask");
    for (server, aaaa, expected) in [
        (SocketAddr::from((DNS_IP, 53)), false, web4),
        (SocketAddr::new(dns_ip6(), 53), true, web6),
    ] {
        let server_arg = server.to_string();
        let mut args = vec!["dns-query", "--server", &server_arg, "--name", WEB_NAME];
        if aaaa {
            args.push("--aaaa");
        }
        let what = format!("raw query to {server}");
        let out = tb.client_command(&both, xtask, &args, TIMEOUT)?;
        let answer: DnsAnswer = serde_json::from_str(stdout(&out, &what, &tb)?.trim())?;
        ensure!(
            answer.from == server_arg && answer.addresses == [expected],
            "{what}: {answer:?}"
        );
    }

    // DNS over TCP, through the Service's TCP port 53.
    let out = tb.client_command(
        &both,
        "dig",
        &["+tcp", "+short", "@10.96.0.53", WEB_NAME, "A"],
        TIMEOUT,
    )?;
    let got = stdout(&out, "dig +tcp", &tb)?;
    ensure!(got.trim() == "10.96.0.10", "dig +tcp @10.96.0.53: {got:?}");

    // The control: a client outside lb's cgroup asks the same ClusterIP and gets nothing, since
    // only lb's translation takes a datagram to it anywhere.
    let out = tb.command_in(
        tb.client_netns(),
        None,
        Some(&v4_only),
        musl,
        &["-4", "web"],
        TIMEOUT,
    )?;
    ensure!(
        !out.status.success(),
        "a resolver outside the cgroup reached kube-dns: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// The seed exercise's check: fetch a Service by its short name, as `wget -qO- web` in a Pod.
pub fn fetch_by_name() -> anyhow::Result<()> {
    let (pods, tb) = dns_testbed()?;
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let both = Resolv::pod("demo", &[DNS_IP.into(), dns_ip6()]);

    let musl = clients::musl_resolve()?;
    let musl = musl.to_str().context("musl client path")?;
    for (cmd, args, what) in [
        (
            "busybox",
            vec!["wget", "-qO-", "http://web/"],
            "wget (glibc)",
        ),
        (musl, vec!["-4", "web", "--http", "80"], "musl, IPv4"),
        (musl, vec!["-6", "web", "--http", "80"], "musl, IPv6"),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..12 {
            let out = tb.client_command(&both, cmd, &args, TIMEOUT)?;
            let text = stdout(&out, what, &tb)?;
            let body = text.lines().last().unwrap_or("").trim().to_owned();
            ensure!(names.contains(&body.as_str()), "{what}: got {text:?}");
            seen.insert(body);
        }
        ensure!(seen.len() >= 2, "{what}: 12 fetches all went to {seen:?}");
        eprintln!("{what}: http://web/ answered by {seen:?}");
    }
    Ok(())
}
