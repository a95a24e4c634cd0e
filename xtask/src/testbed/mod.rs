//! The testbed shared by the demo, the end-to-end tests and the benchmarks: "pods" and clients in
//! their own network namespaces, each on a veth to a bridge in a switch namespace (so every client
//! has the same path to every pod), a cgroup for the clients, a private BPF filesystem, a manifest
//! directory, and lb-agent running on them.
//!
//! Network safety: traffic only ever goes between namespaces made here. The client namespace has
//! no default route, only the pods' subnets, and `unreachable` routes for the Service CIDRs, so a
//! connect to a ClusterIP that lb did not rewrite fails locally. Nothing host-wide is touched; all
//! names are `lbt<pid>-<n>...` and removed on every exit path (see [`cleanup`]).
//!
//! Addresses: every namespace on the bridge has an IPv4 address in 10.244.1.0/24 and the IPv6
//! address with the same last byte in fd00:244:1::/64 ([`ip6_of`]): pods 10.244.1.N and
//! fd00:244:1::N, the client .254 and ::fe. Service CIDRs: 10.96.0.0/12 and fd00:96::/112.
//!
//! Real programs (glibc's and musl's resolvers, busybox, dig) run as clients through
//! [`Testbed::client_command`], and a DNS pod running dnsmasq answers their queries
//! ([`Testbed::add_dns_pod`]).

pub mod agent;
pub mod builds;
pub mod cleanup;
pub mod clients;
pub mod cluster;
pub mod control_plane;
pub mod dns;
pub mod dns_query;
pub mod exec;
pub mod fake_api;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod pod;
pub mod probe;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};

use agent::Agent;
use cleanup::{Guard, Undo};
use dns::DnsServer;
pub use exec::Resolv;
use netns::Netns;
use pod::PodServer;
use probe::{Attempt, ProbeArgs};

/// The Service CIDR, made unreachable in the client namespace.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The IPv6 Service CIDR, made unreachable in the client namespace too.
pub const SERVICE_CIDR6: &str = "fd00:96::/112";
/// The pods' subnet and the client's address on it.
pub const POD_PREFIX_LEN: u8 = 24;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 254);
/// The pods' IPv6 subnet (fd00:244:1::/64) and the client's address on it.
pub const POD_PREFIX_LEN6: u8 = 64;
pub const CLIENT_IP6: Ipv6Addr = ip6_of(CLIENT_IP);

/// The IPv6 address that goes with a namespace's IPv4 address on the bridge: the same last byte
/// in fd00:244:1::/64 (10.244.1.7 → fd00:244:1::7, 10.244.1.254 → fd00:244:1::fe).
pub const fn ip6_of(ip: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, ip.octets()[3] as u16)
}

/// How a client namespace routes the Service CIDRs (IPv4 and IPv6); either way nothing sent there
/// leaves it.
#[derive(Clone, Copy, Debug)]
pub enum ServiceRoute {
    /// `unreachable`: a connect lb did not rewrite fails at once with EHOSTUNREACH (the default).
    Unreachable,
    /// Into the namespace's own loopback, where a packet for an address that is not local is
    /// dropped (the namespace does not forward, for IPv4 nor IPv6). For iptables DNAT in OUTPUT:
    /// the kernel routes a local connect before netfilter sees it, so an unreachable route would
    /// refuse it before the DNAT rule could apply; a DNATed packet is routed again, to its pod.
    Discard,
}

/// A pod: its name (what it answers), address and listening ports. It also has the IPv6 address
/// [`PodSpec::ip6`], and its servers answer on both.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Ports that answer HTTP with the name, then close.
    pub tcp_ports: Vec<u16>,
    /// TCP ports that answer each line with the name and a newline, on the same connection for
    /// as long as the client keeps it open.
    pub line_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// Ports that echo every byte back on TCP and every datagram back on UDP (for the
    /// benchmarks).
    pub echo_ports: Vec<u16>,
}

impl PodSpec {
    /// `count` pods `{prefix}-1..` at 10.244.1.1.. listening on `tcp_ports`.
    pub fn numbered(prefix: &str, count: u8, tcp_ports: &[u16]) -> Vec<Self> {
        (1..=count)
            .map(|i| PodSpec {
                name: format!("{prefix}-{i}"),
                ip: Ipv4Addr::new(10, 244, 1, i),
                tcp_ports: tcp_ports.to_vec(),
                line_ports: vec![],
                udp_ports: vec![],
                echo_ports: vec![],
            })
            .collect()
    }

    /// The DNS pod `coredns-1` at `ip`, for [`Testbed::add_dns_pod`]: its dnsmasq answers on
    /// port 53, and it serves nothing else.
    pub fn coredns(ip: Ipv4Addr) -> Self {
        PodSpec {
            name: "coredns-1".into(),
            ip,
            tcp_ports: vec![],
            line_ports: vec![],
            udp_ports: vec![],
            echo_ports: vec![],
        }
    }

    /// The pod's IPv6 address (fd00:244:1::N for 10.244.1.N; see [`ip6_of`]).
    ///
    /// Derived rather than a field, so the existing `PodSpec { .. }` literals stay valid.
    pub fn ip6(&self) -> Ipv6Addr {
        ip6_of(self.ip)
    }
}

/// Finds a program on PATH, or in the sbin directories a non-login PATH may lack (dnsmasq and
/// bpftool live in /usr/sbin on Debian).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub struct Testbed {
    pub id: String,
    agent_bin: PathBuf,
    probe_bin: PathBuf,
    echo_agent: Option<&'static str>,
    /// More `lb-agent run` flags, for every start from now on.
    agent_flags: Vec<String>,
    /// Where the agent gets Services from: the manifest directory, or an API server.
    kubeconfig: Option<(PathBuf, Option<String>)>,
    // Dropped in this order: agent, pods, DNS pods, their cgroup, clients, switch, cgroup, BPF
    // mount, directory.
    agent: Option<Agent>,
    pods: Vec<(PodSpec, PodServer, Netns)>,
    dns_pods: Vec<DnsPod>,
    dns_cgroup: Option<(PathBuf, Guard)>,
    client: Netns,
    extra_clients: Vec<Netns>,
    switch: Netns,
    cgroup: PathBuf,
    _cgroup: Guard,
    pin_dir: PathBuf,
    _bpffs: Guard,
    manifests: PathBuf,
    dir: PathBuf,
    _dir: Guard,
}

/// A DNS pod's parts, dropped in this order: dnsmasq, other servers, namespace.
struct DnsPod {
    spec: PodSpec,
    dns: DnsServer,
    _servers: Option<PodServer>,
    _ns: Netns,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(1);

impl Testbed {
    /// Builds the namespaces, cgroup and mounts; starts the pods' servers. `probe_bin` is an
    /// executable with the `probe` and `exec` subcommands (xtask). `agent_bin` need only exist
    /// once the agent is started.
    pub fn new(agent_bin: &Path, probe_bin: &Path, pods: &[PodSpec]) -> anyhow::Result<Self> {
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "the testbed needs root (network namespaces, cgroups, BPF): run `xtask/run test` as root"
            );
        }
        let cgroup_root = lb_agent::cgroup::cgroup2_mount()?;
        cleanup::sweep_stale(&cgroup_root);
        let id = format!(
            "{}{}-{}",
            cleanup::PREFIX,
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );

        let dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&dir)?;
        let dir_guard = cleanup::register(Undo::RemoveDir(dir.clone()));
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        // What client programs see instead of the host's /etc files (with their resolv.conf):
        // DNS only from the testbed's servers, no nscd, no systemd-resolved.
        std::fs::write(
            dir.join("nsswitch.conf"),
            "passwd: files\ngroup: files\nhosts: files dns\n",
        )?;
        std::fs::write(dir.join("hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;

        // A private BPF filesystem: the agent's pins live and die with this testbed.
        let bpffs = dir.join("bpf");
        std::fs::create_dir_all(&bpffs)?;
        lb_agent::dataplane::bpf::mount_bpffs(&bpffs)?;
        let bpffs_guard = cleanup::register(Undo::Unmount(bpffs.clone()));

        let cgroup = cgroup_root.join(&id);
        std::fs::create_dir(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let cgroup_guard = cleanup::register(Undo::Cgroup(cgroup.clone()));

        let switch = Netns::create(&format!("{id}-s"))?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let client = Netns::create(&format!("{id}-c"))?;
        attach(switch.name(), &client, "vc0", CLIENT_IP)?;
        route_services(&client, ServiceRoute::Unreachable)?;

        let mut testbed = Self {
            id,
            agent_bin: agent_bin.to_owned(),
            probe_bin: probe_bin.to_owned(),
            echo_agent: None,
            agent_flags: Vec::new(),
            kubeconfig: None,
            agent: None,
            pods: Vec::new(),
            dns_pods: Vec::new(),
            dns_cgroup: None,
            client,
            extra_clients: Vec::new(),
            switch,
            cgroup,
            _cgroup: cgroup_guard,
            pin_dir: bpffs.join("lb"),
            _bpffs: bpffs_guard,
            manifests,
            dir,
            _dir: dir_guard,
        };
        for pod in pods {
            testbed.add_pod(pod.clone())?;
        }
        Ok(testbed)
    }

    /// The switch namespace whose bridge connects every pod and client (for the testbed's own
    /// nodes, [`node::Nodes`], which add pods as they come).
    pub fn switch_netns(&self) -> &str {
        self.switch.name()
    }

    /// Runs `bin` as the agent (and for `lb-agent` commands) from its next start on: another
    /// version, for the upgrade tests ([`builds`]).
    pub fn set_agent_bin(&mut self, bin: &Path) {
        self.agent_bin = bin.to_owned();
    }

    /// Passes `flags` to `lb-agent run` at every start from now on.
    pub fn agent_flags(&mut self, flags: &[&str]) {
        self.agent_flags = flags.iter().map(|f| f.to_string()).collect();
    }

    /// Print the agent's log lines with this prefix as they come (the demo does).
    pub fn echo_agent_log(&mut self, prefix: &'static str) {
        self.echo_agent = Some(prefix);
    }

    fn add_pod(&mut self, pod: PodSpec) -> anyhow::Result<()> {
        let index = self.pods.len() + 1;
        let ns = Netns::create(&format!("{}-p{index}", self.id))?;
        attach(self.switch.name(), &ns, &format!("vp{index}"), pod.ip)?;
        let server = PodServer::start(
            ns.name(),
            &pod.name,
            &pod.tcp_ports,
            &pod.line_ports,
            &pod.udp_ports,
            &pod.echo_ports,
        )?;
        self.pods.push((pod, server, ns));
        Ok(())
    }

    /// A DNS pod: dnsmasq in its own pod namespace at `spec.ip` and `spec.ip6()`, answering
    /// `records` (name → address: an A record for IPv4, AAAA for IPv6; a name may have both) on
    /// UDP and TCP port 53, and NXDOMAIN for other names under cluster.local. It never forwards.
    /// The ports in `spec` are served as by any pod. Returns once dnsmasq answers from the
    /// client namespace on both addresses.
    ///
    /// Names are used as written: give them fully qualified (`web.demo.svc.cluster.local`) and
    /// let the client's search list ([`Resolv::pod`]) expand short ones.
    pub fn add_dns_pod(
        &mut self,
        spec: &PodSpec,
        records: &[(&str, IpAddr)],
    ) -> anyhow::Result<()> {
        let index = self.dns_pods.len() + 1;
        let ns = Netns::create(&format!("{}-d{index}", self.id))?;
        attach(self.switch.name(), &ns, &format!("vd{index}"), spec.ip)?;
        let ports = [
            &spec.tcp_ports,
            &spec.line_ports,
            &spec.udp_ports,
            &spec.echo_ports,
        ];
        let servers = if ports.iter().all(|p| p.is_empty()) {
            None
        } else {
            Some(PodServer::start(
                ns.name(),
                &spec.name,
                &spec.tcp_ports,
                &spec.line_ports,
                &spec.udp_ports,
                &spec.echo_ports,
            )?)
        };
        let cgroup = match &self.dns_cgroup {
            Some((cgroup, _)) => cgroup.clone(),
            None => {
                // Not the client cgroup: lb must not see dnsmasq's own sockets.
                let cgroup = self.cgroup.with_file_name(format!("{}-dns", self.id));
                std::fs::create_dir(&cgroup)
                    .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
                let guard = cleanup::register(Undo::Cgroup(cgroup.clone()));
                self.dns_cgroup.insert((cgroup, guard)).0.clone()
            }
        };
        let place = dns::DnsPlace {
            netns: ns.name(),
            cgroup: &cgroup,
            addrs: &[spec.ip.into(), spec.ip6().into()],
            dir: &self.dir,
            check_from: self.client.name(),
        };
        let dns = DnsServer::start(&self.probe_bin, &format!("dns-{index}"), &place, records)?;
        self.dns_pods.push(DnsPod {
            spec: spec.clone(),
            dns,
            _servers: servers,
            _ns: ns,
        });
        Ok(())
    }

    /// The query log of the DNS pod named `name` (dnsmasq's `--log-queries`), for test failures.
    pub fn dns_log(&self, name: &str) -> anyhow::Result<String> {
        let pod = self
            .dns_pods
            .iter()
            .find(|p| p.spec.name == name)
            .with_context(|| format!("no DNS pod named {name}"))?;
        let path = pod.dns.log_path();
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }

    /// Another client namespace (`{id}-{suffix}`) at `ip` and at [`ip6_of`]`(ip)`; returns its
    /// name.
    pub fn add_client(
        &mut self,
        suffix: &str,
        ip: Ipv4Addr,
        services: ServiceRoute,
    ) -> anyhow::Result<String> {
        let ns = Netns::create(&format!("{}-{suffix}", self.id))?;
        let port = format!("vc{}", self.extra_clients.len() + 1);
        attach(self.switch.name(), &ns, &port, ip)?;
        route_services(&ns, services)?;
        let name = ns.name().to_owned();
        self.extra_clients.push(ns);
        Ok(name)
    }

    /// Where the agent under test pins its maps: its layout version's directory under
    /// [`pin_dir`](Self::pin_dir).
    pub fn maps_dir(&self) -> PathBuf {
        lb_agent::dataplane::bpf::layout_dir(&self.pin_dir, lb_common::LAYOUT_VERSION)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The directory the agent reads manifests from (see [`write_manifest`](Self::write_manifest)).
    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn client_netns(&self) -> &str {
        self.client.name()
    }

    /// Runs `cmd args` (found on PATH) in the client namespace, inside the cgroup, seeing
    /// `resolv` as /etc/resolv.conf; kills it after `timeout` (an error, with what it printed).
    /// Its exit status is for the caller to judge.
    pub fn client_command(
        &self,
        resolv: &Resolv,
        cmd: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        self.command_in(
            self.client.name(),
            Some(&self.cgroup),
            Some(resolv),
            cmd,
            args,
            timeout,
        )
    }

    /// [`client_command`](Self::client_command) in any namespace (an extra client's, say), in
    /// `cgroup` or none, with or without a resolv.conf of the testbed's (without: the host's).
    pub fn command_in(
        &self,
        netns: &str,
        cgroup: Option<&Path>,
        resolv: Option<&Resolv>,
        cmd: &str,
        args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Output> {
        let mut binds = Vec::new();
        if let Some(resolv) = resolv {
            static NEXT_RESOLV: AtomicU32 = AtomicU32::new(1);
            let file = self.dir.join(format!(
                "resolv-{}.conf",
                NEXT_RESOLV.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&file, resolv.render())?;
            binds.extend([
                (file, "/etc/resolv.conf".into()),
                (self.dir.join("nsswitch.conf"), "/etc/nsswitch.conf".into()),
                (self.dir.join("hosts"), "/etc/hosts".into()),
            ]);
        }
        let child = exec::command(&self.probe_bin, netns, cgroup, &binds, cmd, args)
            .spawn()
            .with_context(|| format!("starting {} exec", self.probe_bin.display()))?;
        exec::wait_with_timeout(child, &format!("{cmd} {}", args.join(" ")), timeout)
    }

    /// Writes a manifest atomically (a temporary dot-file renamed into place), as a tool would.
    pub fn write_manifest(&self, name: &str, text: &str) -> anyhow::Result<()> {
        self.write_manifest_timed(name, text).map(drop)
    }

    /// [`write_manifest`](Self::write_manifest); returns when the rename began, in µs since the
    /// Unix epoch ([`probe::now_us`]), to time what follows the change from there.
    pub fn write_manifest_timed(&self, name: &str, text: &str) -> anyhow::Result<u64> {
        let tmp = self.manifests.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        let renaming = probe::now_us();
        std::fs::rename(&tmp, self.manifests.join(name))?;
        Ok(renaming)
    }

    /// From now on, the agent follows `api` (as node `node_name`) instead of the manifests.
    pub fn use_api(
        &mut self,
        api: &fake_api::FakeApi,
        node_name: Option<&str>,
    ) -> anyhow::Result<()> {
        let path = self.manifests.with_file_name("kubeconfig");
        api.write_kubeconfig(&path)?;
        self.kubeconfig = Some((path, node_name.map(str::to_owned)));
        Ok(())
    }

    /// From now on, the agent follows the API server of `kubeconfig` (a real control plane's,
    /// [`control_plane::ControlPlane`]) as node `node_name`, instead of the manifests.
    pub fn use_kubeconfig(&mut self, kubeconfig: &Path, node_name: &str) {
        self.kubeconfig = Some((kubeconfig.to_owned(), Some(node_name.to_owned())));
    }

    /// Starts the agent and waits until it is ready (its initial sync is done).
    pub fn start_agent(&mut self) -> anyhow::Result<&mut Agent> {
        let agent = self.spawn_agent()?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Starts the agent without waiting for anything.
    pub fn spawn_agent(&mut self) -> anyhow::Result<&mut Agent> {
        if self.agent.is_some() {
            bail!("the agent is already running");
        }
        if !self.agent_bin.exists() {
            bail!(
                "{} not found: build it first (`cargo build -p lb-agent`; `xtask/run test` does)",
                self.agent_bin.display()
            );
        }
        let mut args: Vec<std::ffi::OsString> = vec!["run".into()];
        match &self.kubeconfig {
            None => args.extend(["--manifests".into(), self.manifests.clone().into()]),
            Some((kubeconfig, node)) => {
                args.extend(["--kubeconfig".into(), kubeconfig.clone().into()]);
                if let Some(node) = node {
                    args.extend(["--node-name".into(), node.into()]);
                }
            }
        }
        let health = free_loopback_addr()?;
        args.extend([
            "--cgroup".into(),
            self.cgroup.clone().into(),
            "--pin-dir".into(),
            self.pin_dir.clone().into(),
            "--health-addr".into(),
            health.to_string().into(),
        ]);
        args.extend(self.agent_flags.iter().map(Into::into));
        let agent = Agent::start(&self.agent_bin, &args, health, self.echo_agent)?;
        Ok(self.agent.insert(agent))
    }

    pub fn agent(&mut self) -> &mut Agent {
        self.agent
            .as_mut()
            .expect("the agent is not running: call start_agent first")
    }

    /// Stops the agent with SIGTERM (the datapath stays attached).
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        match self.agent.take() {
            Some(mut agent) => agent.stop(),
            None => Ok(()),
        }
    }

    /// What the maps hold, as `lb-agent list -o json` shows it, read with the agent's own schema.
    pub fn listing(&self) -> anyhow::Result<lb_agent::list::Listing> {
        serde_json::from_str(&self.agent_command(&["list", "-o", "json"])?)
            .context("lb-agent list -o json does not match its schema")
    }

    /// Runs `lb-agent ARGS --pin-dir PIN_DIR` and returns its stdout.
    pub fn agent_command(&self, args: &[&str]) -> anyhow::Result<String> {
        agent::command(&self.agent_bin, args, &self.pin_dir)
    }

    /// Probe arguments for `target` from the client namespace, inside the cgroup.
    pub fn probe_args(&self, target: SocketAddr, count: u32) -> ProbeArgs {
        ProbeArgs {
            netns: self.client.name().to_owned(),
            cgroup: Some(self.cgroup.clone()),
            target,
            also: Vec::new(),
            echo: false,
            udp: false,
            hold: false,
            udp_unconnected: false,
            messages: 1,
            peer: false,
            count,
            duration_ms: None,
            interval_ms: 0,
        }
    }

    /// Runs a probe to completion.
    pub fn probe(&self, args: &ProbeArgs) -> anyhow::Result<Vec<Attempt>> {
        probe::collect(self.spawn_probe(args)?)
    }

    pub fn spawn_probe(&self, args: &ProbeArgs) -> anyhow::Result<std::process::Child> {
        probe::spawn(&self.probe_bin, args)
    }

    /// Starts a probe that runs while the test goes on, its output read as it comes.
    pub fn start_probe(&self, args: &ProbeArgs) -> anyhow::Result<probe::Running> {
        probe::start(&self.probe_bin, args)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = self.stop_agent();
    }
}

/// A loopback address with a port free right now, for the agent's health address: nothing
/// listens on the host's interfaces, and the testbed knows where to scrape without reading the
/// agent's log. (Should another process take the port first, the agent fails to start, saying
/// so.)
fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}

/// Routes the Service CIDRs (IPv4 and IPv6) in a client namespace.
fn route_services(ns: &Netns, services: ServiceRoute) -> anyhow::Result<()> {
    for cidr in [SERVICE_CIDR, SERVICE_CIDR6] {
        let family = if cidr.contains(':') { "-6" } else { "-4" };
        match services {
            ServiceRoute::Unreachable => ns.ip(&[family, "route", "add", "unreachable", cidr])?,
            ServiceRoute::Discard => ns.ip(&[family, "route", "add", cidr, "dev", "lo"])?,
        }
    }
    Ok(())
}

/// Connects `ns` to the switch's bridge with a veth (`port` on the bridge side, `eth0` inside) and
/// gives it `ip` on the pods' subnet and [`ip6_of`]`(ip)` on their IPv6 subnet: no other route.
fn attach(switch: &str, ns: &Netns, port: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    let switch = |args: &[&str]| netns::ip(&[&["-n", switch], args].concat());
    switch(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ])?;
    switch(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{ip}/{POD_PREFIX_LEN}"),
        "dev",
        "eth0",
    ])?;
    // nodad: usable at once, not "tentative" for the second duplicate address detection takes.
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/{POD_PREFIX_LEN6}", ip6_of(ip)),
        "dev",
        "eth0",
        "nodad",
    ])
    .context("adding an IPv6 address (is IPv6 disabled on this host? the testbed needs it)")?;
    ns.ip(&["link", "set", "eth0", "up"])
}
