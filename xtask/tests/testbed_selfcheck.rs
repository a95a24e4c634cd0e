//! Checks of the testbed itself, without lb: the pods answer on IPv4 and IPv6, every probe mode
//! reports what it should, the Service CIDRs fail locally, the DNS pod answers glibc's, musl's
//! and dig's resolvers, and everything is gone afterwards. When an end-to-end test fails, this
//! says whether the testbed or the datapath is at fault. The real control plane starts, runs a
//! Deployment and a Service, survives an API server restart and an etcd compaction, and leaves
//! nothing behind. Root only, like the e2e tests: `cargo test -p xtask --test testbed_selfcheck`.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::Output,
    time::Duration,
};

use anyhow::{Context as _, ensure};
use libtest_mimic::{Arguments, Trial};
use xtask::testbed::{
    self, PodSpec, Resolv, ServiceRoute, Testbed, agent, clients,
    control_plane::{ControlPlane, K8sBinaries},
    probe::{Attempt, ProbeArgs, v4_mapped},
};

const HTTP: u16 = 8080;
const UDP: u16 = 5353;
const DNS_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 53);
const WEB_NAME: &str = "web.demo.svc.cluster.local";
const V4_ONLY_NAME: &str = "v4only.demo.svc.cluster.local";
const TIMEOUT: Duration = Duration::from_secs(15);

type Check = fn() -> anyhow::Result<()>;

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let checks: Vec<(&str, Check)> = vec![
        (
            "pods_answer_tcp_and_udp_on_ipv4_and_ipv6_in_every_probe_mode",
            probe_modes,
        ),
        (
            "service_cidrs_fail_at_once_or_go_nowhere_never_forwarded",
            service_cidrs_unreachable,
        ),
        ("dns_pod_answers_glibc_musl_busybox_and_dig", dns_pod),
        (
            "exec_binds_resolv_conf_privately_and_everything_is_removed_on_drop",
            exec_and_cleanup,
        ),
    ];
    let mut trials: Vec<Trial> = checks
        .into_iter()
        .map(|(name, check)| {
            Trial::test(name, move || check().map_err(|e| format!("{e:#}").into()))
        })
        .collect();
    // Without the binaries (outside CI): reported as ignored, saying how to provide them.
    let binaries = match args.list {
        true => None,
        false => K8sBinaries::locate_for_tests().unwrap_or_else(|e| {
            eprintln!("error: {e:#}");
            std::process::exit(1)
        }),
    };
    let ignored = binaries.is_none();
    trials.push(
        Trial::test(
            "control_plane_runs_a_deployment_and_a_service_across_a_restart_and_a_compaction",
            move || {
                let binaries = binaries.as_ref().expect("not run when ignored");
                control_plane(binaries).map_err(|e| format!("{e:#}").into())
            },
        )
        .with_ignored_flag(ignored),
    );
    libtest_mimic::run(&args, trials).exit();
}

fn pods() -> Vec<PodSpec> {
    PodSpec::numbered("web", 2, &[HTTP])
        .into_iter()
        .map(|p| PodSpec {
            udp_ports: vec![UDP],
            ..p
        })
        .collect()
}

fn testbed() -> anyhow::Result<Testbed> {
    Testbed::new(
        &agent::default_bin(),
        Path::new(env!("CARGO_BIN_EXE_xtask")),
        &pods(),
    )
}

fn probe(
    tb: &Testbed,
    target: SocketAddr,
    count: u32,
    set: impl FnOnce(&mut ProbeArgs),
) -> anyhow::Result<Vec<Attempt>> {
    let mut args = tb.probe_args(target, count);
    set(&mut args);
    tb.probe(&args)
}

/// Every attempt got `answer`.
fn all_answered(attempts: &[Attempt], answer: &str) -> anyhow::Result<()> {
    ensure!(!attempts.is_empty(), "no attempts");
    ensure!(
        attempts.iter().all(|a| a.answer.as_deref() == Some(answer)),
        "expected every attempt answered by {answer}: {attempts:?}"
    );
    Ok(())
}

fn probe_modes() -> anyhow::Result<()> {
    let tb = testbed()?;
    let pod = &pods()[0];
    let v4 = SocketAddr::from((pod.ip, HTTP));
    let v6 = SocketAddr::from((pod.ip6(), HTTP));
    ensure!(pod.ip6() == "fd00:244:1::1".parse::<Ipv6Addr>()?);

    // TCP (HTTP), with getpeername, on both families and through an IPv4-mapped address.
    for target in [v4, v6, v4_mapped(v4)] {
        let attempts = probe(&tb, target, 2, |a| a.peer = true)?;
        all_answered(&attempts, "web-1")?;
        ensure!(
            attempts.iter().all(|a| a.peer == Some(target.to_string())),
            "TCP to {target}: peer should be the target: {attempts:?}"
        );
        ensure!(
            attempts
                .iter()
                .all(|a| a.from.is_none() && a.socket.is_none())
        );
    }
    // Without --peer, no peer.
    let attempts = probe(&tb, v4, 1, |_| {})?;
    ensure!(attempts[0].peer.is_none(), "{attempts:?}");

    // Connected UDP, with getpeername.
    for ip in [IpAddr::from(pod.ip), pod.ip6().into()] {
        let target = SocketAddr::from((ip, UDP));
        let attempts = probe(&tb, target, 2, |a| {
            a.udp = true;
            a.peer = true;
        })?;
        all_answered(&attempts, "web-1")?;
        ensure!(
            attempts.iter().all(|a| a.peer == Some(target.to_string())),
            "connected UDP to {target}: {attempts:?}"
        );
    }

    // Unconnected UDP: 3 sockets × 2 datagrams, the reply's source as recvfrom saw it.
    let v4_udp = SocketAddr::from((pod.ip, UDP));
    for target in [
        v4_udp,
        SocketAddr::from((pod.ip6(), UDP)),
        v4_mapped(v4_udp),
    ] {
        let attempts = probe(&tb, target, 3, |a| {
            a.udp_unconnected = true;
            a.messages = 2;
        })?;
        ensure!(attempts.len() == 6, "3 sockets × 2 datagrams: {attempts:?}");
        all_answered(&attempts, "web-1")?;
        ensure!(
            attempts.iter().all(|a| a.from == Some(target.to_string())),
            "unconnected UDP to {target}: replies should come from it: {attempts:?}"
        );
        let sockets: Vec<Option<u32>> = attempts.iter().map(|a| a.socket).collect();
        ensure!(
            sockets == [0, 0, 1, 1, 2, 2].map(Some),
            "socket indexes: {sockets:?}"
        );
    }

    // The other pod answers as itself: the servers are per pod.
    let other = SocketAddr::from((pods()[1].ip6(), HTTP));
    all_answered(&probe(&tb, other, 1, |_| {})?, "web-2")?;

    // Old probe lines (without the new fields) still parse.
    let old: Attempt =
        serde_json::from_str(r#"{"at_us":1,"connect_us":2,"answer":"web-1","error":null}"#)?;
    ensure!(old.peer.is_none() && old.from.is_none() && old.socket.is_none());
    Ok(())
}

fn service_cidrs_unreachable() -> anyhow::Result<()> {
    let tb = testbed()?;
    let v4: IpAddr = Ipv4Addr::new(10, 96, 0, 10).into();
    let v6: IpAddr = "fd00:96::10".parse::<Ipv6Addr>()?.into();
    for ip in [v4, v6] {
        for (mode, udp, unconnected) in [
            ("TCP", false, false),
            ("UDP", true, false),
            ("unconnected UDP", false, true),
        ] {
            let attempts = probe(&tb, SocketAddr::from((ip, 80)), 2, |a| {
                a.udp = udp;
                a.udp_unconnected = unconnected;
            })?;
            ensure!(
                attempts.iter().all(|a| {
                    matches!(a.error.as_deref(), Some("EHOSTUNREACH" | "ENETUNREACH"))
                        && a.connect_us < 100_000
                }),
                "{mode} to {ip}: should fail at once as unreachable: {attempts:?}"
            );
        }
    }

    // A client with the benchmark's discard route: the Service CIDRs go nowhere (a connect
    // times out instead of failing at once), and the pods are reached on both families.
    let mut tb = tb;
    let discard = tb.add_client("x", Ipv4Addr::new(10, 244, 1, 240), ServiceRoute::Discard)?;
    for ip in [v4, v6] {
        let mut args = tb.probe_args(SocketAddr::from((ip, 80)), 1);
        args.netns = discard.clone();
        args.cgroup = None;
        let attempts = tb.probe(&args)?;
        ensure!(
            attempts
                .iter()
                .all(|a| a.answer.is_none() && a.connect_us >= 900_000),
            "TCP to {ip} from the discarding client should time out: {attempts:?}"
        );
    }
    let pod = &pods()[1];
    for ip in [IpAddr::from(pod.ip), pod.ip6().into()] {
        let mut args = tb.probe_args(SocketAddr::from((ip, HTTP)), 1);
        args.netns = discard.clone();
        args.peer = true;
        all_answered(&tb.probe(&args)?, "web-2")?;
    }
    Ok(())
}

/// The DNS pod's records: `web` has A and AAAA, `v4only` only A.
fn dns_testbed() -> anyhow::Result<(Testbed, PodSpec)> {
    let mut tb = testbed()?;
    let dns = PodSpec {
        name: "dns".into(),
        ip: DNS_POD_IP,
        tcp_ports: vec![],
        line_ports: vec![],
        udp_ports: vec![],
        echo_ports: vec![],
    };
    let web = &pods()[0];
    tb.add_dns_pod(
        &dns,
        &[
            (WEB_NAME, web.ip.into()),
            (WEB_NAME, web.ip6().into()),
            (V4_ONLY_NAME, pods()[1].ip.into()),
        ],
    )?;
    Ok((tb, dns))
}

/// stdout of a command that must succeed.
fn stdout(out: Output, what: &str) -> anyhow::Result<String> {
    ensure!(
        out.status.success(),
        "{what} failed ({}): stdout {:?}, stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// The distinct addresses in `getent ahosts` output (one line per address and socket type).
fn getent_addresses(text: &str) -> Vec<String> {
    let mut addresses: Vec<String> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

fn dns_pod() -> anyhow::Result<()> {
    let (tb, dns) = dns_testbed()?;
    let web = &pods()[0];
    let (web4, web6) = (web.ip.to_string(), web.ip6().to_string());
    let both = {
        let mut both = vec![web4.clone(), web6.clone()];
        both.sort();
        both
    };
    let musl = clients::musl_resolve()?;
    let musl = musl.to_str().context("a UTF-8 path")?;
    let log = || tb.dns_log("dns").unwrap_or_default();

    // Both nameservers (musl then asks the IPv4 one through an IPv4-mapped address on an
    // AF_INET6 socket), each alone, and a short name expanded by the search list.
    let resolvs = [
        Resolv::pod("demo", &[dns.ip.into(), dns.ip6().into()]),
        Resolv::pod("demo", &[dns.ip.into()]),
        Resolv::pod("demo", &[dns.ip6().into()]),
    ];
    for resolv in &resolvs {
        let run = |cmd: &str, args: &[&str]| -> anyhow::Result<String> {
            let what = format!("{cmd} {} with {:?}", args.join(" "), resolv.nameservers);
            stdout(tb.client_command(resolv, cmd, args, TIMEOUT)?, &what)
                .with_context(|| format!("dnsmasq's log:\n{}", log()))
        };
        for name in ["web", WEB_NAME] {
            // glibc's getaddrinfo.
            let got = getent_addresses(&run("getent", &["ahosts", name])?);
            ensure!(got == both, "getent ahosts {name}: {got:?}");
            let got = getent_addresses(&run("getent", &["ahostsv4", name])?);
            ensure!(got == [web4.clone()], "getent ahostsv4 {name}: {got:?}");
            let got = getent_addresses(&run("getent", &["ahostsv6", name])?);
            ensure!(got == [web6.clone()], "getent ahostsv6 {name}: {got:?}");
            // musl's getaddrinfo (A and AAAA in parallel over one unconnected socket).
            let got = sorted_lines(&run(musl, &[name])?);
            ensure!(got == both, "musl_resolve {name}: {got:?}");
            let got = sorted_lines(&run(musl, &["-4", name])?);
            ensure!(got == [web4.clone()], "musl_resolve -4 {name}: {got:?}");
            let got = sorted_lines(&run(musl, &["-6", name])?);
            ensure!(got == [web6.clone()], "musl_resolve -6 {name}: {got:?}");
        }
        // A name with only an A record.
        let got = sorted_lines(&run(musl, &["v4only"])?);
        ensure!(
            got == [pods()[1].ip.to_string()],
            "musl_resolve v4only: {got:?}"
        );
        // Resolve, then fetch: musl, and busybox wget (glibc).
        let got = run(musl, &["web", "--http", &HTTP.to_string()])?;
        ensure!(
            got.lines().last() == Some("web-1"),
            "musl_resolve --http: {got:?}"
        );
        let got = run("busybox", &["wget", "-qO-", &format!("http://web:{HTTP}/")])?;
        ensure!(got.trim() == "web-1", "busybox wget: {got:?}");
    }

    // dig over UDP and TCP, straight at each address, and through resolv.conf's search list.
    let resolv = &resolvs[0];
    for server in [dns.ip.to_string(), dns.ip6().to_string()] {
        for transport in ["+notcp", "+tcp"] {
            for (qtype, want) in [("A", &web4), ("AAAA", &web6)] {
                let args = [&format!("@{server}"), transport, "+short", WEB_NAME, qtype];
                let got = stdout(tb.client_command(resolv, "dig", &args, TIMEOUT)?, "dig")?;
                ensure!(got.trim() == want, "dig {}: {got:?}", args.join(" "));
            }
        }
    }
    let got = stdout(
        tb.client_command(
            resolv,
            "dig",
            &["+search", "+short", "web", "AAAA"],
            TIMEOUT,
        )?,
        "dig +search",
    )?;
    ensure!(got.trim() == web6, "dig +search web AAAA: {got:?}");

    // Unknown names fail as unknown (NXDOMAIN), quickly: nothing is forwarded anywhere.
    let out = tb.client_command(resolv, musl, &["nothing"], TIMEOUT)?;
    ensure!(
        out.status.code() == Some(2),
        "musl_resolve nothing: {out:?}"
    );
    let out = tb.client_command(resolv, "getent", &["ahosts", "nothing"], TIMEOUT)?;
    ensure!(
        out.status.code() == Some(2),
        "getent ahosts nothing: {out:?}"
    );
    ensure!(
        log().contains("web.demo.svc.cluster.local"),
        "dnsmasq logged no queries: {}",
        log()
    );
    Ok(())
}

fn exec_and_cleanup() -> anyhow::Result<()> {
    let host_resolv = std::fs::read("/etc/resolv.conf").ok();
    let (tb, dns) = dns_testbed()?;
    let id = tb.id.clone();
    let resolv = Resolv::pod("demo", &[dns.ip.into(), dns.ip6().into()]);
    let got = stdout(
        tb.client_command(&resolv, "cat", &["/etc/resolv.conf"], TIMEOUT)?,
        "cat",
    )?;
    ensure!(got == resolv.render(), "the client saw {got:?}");
    ensure!(
        std::fs::read("/etc/resolv.conf").ok() == host_resolv,
        "the host's /etc/resolv.conf changed"
    );
    // The client is inside the testbed's cgroup and namespace.
    let got = stdout(
        tb.client_command(&resolv, "cat", &["/proc/self/cgroup"], TIMEOUT)?,
        "cat",
    )?;
    ensure!(got.trim_end().ends_with(&id), "cgroup: {got:?}");
    let got = stdout(
        tb.client_command(&resolv, "ip", &["-o", "addr", "show", "eth0"], TIMEOUT)?,
        "ip addr",
    )?;
    ensure!(
        got.contains(&format!("{}/", testbed::CLIENT_IP))
            && got.contains(&format!("{}/", testbed::CLIENT_IP6)),
        "client addresses: {got}"
    );
    // A command that outlives its timeout is killed, and says so.
    let err = tb
        .client_command(&resolv, "sleep", &["5"], Duration::from_millis(200))
        .expect_err("sleep 5 should time out");
    ensure!(err.to_string().contains("killed"), "{err:#}");

    let dns_cgroup = tb.cgroup().with_file_name(format!("{id}-dns"));
    let dnsmasq_pids = std::fs::read_to_string(dns_cgroup.join("cgroup.procs"))?;
    ensure!(
        !dnsmasq_pids.trim().is_empty(),
        "dnsmasq is not in {}",
        dns_cgroup.display()
    );
    drop(tb);

    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()?;
    let left: Vec<String> = String::from_utf8_lossy(&namespaces.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{id}-")))
        .map(str::to_owned)
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    ensure!(!dns_cgroup.exists(), "{} left behind", dns_cgroup.display());
    for pid in dnsmasq_pids.lines() {
        ensure!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "dnsmasq {pid} still runs"
        );
    }
    ensure!(
        !std::env::temp_dir().join(&id).exists(),
        "the temporary directory is left behind"
    );
    Ok(())
}

/// A Deployment of 2 and the Service in front of it.
const WEB_MANIFEST: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: nginx, image: nginx, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 80}]
";

fn control_plane(binaries: &K8sBinaries) -> anyhow::Result<()> {
    let cp = ControlPlane::start(binaries)?;
    let dir = cp
        .kubeconfig()
        .parent()
        .context("kubeconfig's directory")?
        .to_owned();
    ensure!(
        cp.server_url().starts_with("https://127.0.0.1:"),
        "{}",
        cp.server_url()
    );
    cp.kubectl_with_input(&["apply", "-f", "-"], WEB_MANIFEST)?;

    // The API server allocates the ClusterIP from 10.96.0.0/12.
    let ip: Ipv4Addr = cp
        .kubectl(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])?
        .trim()
        .parse()
        .context("the Service's clusterIP")?;
    ensure!(
        ip.octets()[0] == 10 && ip.octets()[1] & 0xf0 == 96,
        "clusterIP {ip} not in {}",
        testbed::SERVICE_CIDR
    );

    // The Deployment and ReplicaSet controllers make 2 Pods, which stay Pending (no kubelet).
    let phases = wait_for(&cp, "2 Pods of web", |cp| {
        let phases = cp.kubectl(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ])?;
        Ok((phases.split_whitespace().count() == 2).then_some(phases))
    })?;
    ensure!(
        phases.split_whitespace().all(|p| p == "Pending"),
        "phases: {phases}"
    );
    // The EndpointSlice controller makes the Service's slice.
    wait_for(&cp, "the EndpointSlice of web", |cp| {
        let slices = cp.kubectl(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "name",
        ])?;
        Ok((slices.lines().count() == 1).then_some(()))
    })?;
    let service_version = cp.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.metadata.resourceVersion}",
    ])?;

    cp.restart_apiserver()?;
    let services = cp.kubectl(&["get", "svc", "-o", "name"])?;
    ensure!(
        services.lines().any(|l| l == "service/web"),
        "after the restart: {services}"
    );

    // A list at the Service's version reaches etcd: it works until the compaction, then 410.
    let exact = format!(
        "/api/v1/namespaces/default/services?resourceVersion={}&resourceVersionMatch=Exact",
        service_version.trim()
    );
    cp.kubectl(&["get", "--raw", &exact])?;
    cp.compact_etcd()?;
    let err = cp
        .kubectl(&["get", "--raw", &exact])
        .expect_err("a list at a compacted version should fail");
    ensure!(
        format!("{err:#}").contains("too old"),
        "after the compaction: {err:#}"
    );

    drop(cp);
    ensure!(!dir.exists(), "{} left behind", dir.display());
    let dir = dir.display().to_string();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        ensure!(!cmdline.contains(&dir), "still running: {cmdline}");
    }
    Ok(())
}

/// Asks `check` twice a second until it returns a value, for at most [`TIMEOUT`].
fn wait_for<T>(
    cp: &ControlPlane,
    what: &str,
    check: impl Fn(&ControlPlane) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let attempts = TIMEOUT.as_millis() / 500;
    for _ in 0..attempts {
        if let Some(value) = check(cp)? {
            return Ok(value);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    anyhow::bail!("no {what} within {TIMEOUT:?}")
}
