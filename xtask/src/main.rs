//! `cargo xtask`: build, demo, test (and the probe helper the testbed runs).
//! New machines start with `xtask/run`, which installs the toolchain first.

mod bench;
mod demo;
mod demo_cluster;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::testbed::{dns_query, exec, probe};

#[derive(Parser)]
#[command(about = "lb's build, demo and test tasks (start with xtask/run on a new machine)")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Check that this machine can run lb (root, kernel BTF, cgroup v2, tools).
    Setup,
    /// Build the agent (with its eBPF programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Walk through lb on veth namespaces and the manifests in deploy/examples.
    Demo {
        /// The same exercise with kubectl on a real control plane (etcd, kube-apiserver,
        /// kube-controller-manager from ../shared/k8s or LB_K8S_BIN_DIR) and the testbed's node.
        #[arg(long)]
        cluster: bool,
    },
    /// Benchmarks: lb against no load balancer and kube-proxy's iptables shape (root; several
    /// minutes). Prints a table; the JSON goes to target/bench.json.
    Bench {
        /// A short run (up to 1 000 Services) to check the benchmark itself.
        #[arg(long)]
        quick: bool,
        /// Only these numbers of Services (comma-separated).
        #[arg(long, value_delimiter = ',')]
        scales: Option<Vec<usize>>,
    },
    /// Unit tests, then the privileged end-to-end tests (root).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// (testbed) connect to an address from a namespace and report who answered.
    #[command(hide = true)]
    Probe(probe::ProbeArgs),
    /// (testbed) run a program in a namespace and cgroup, with the testbed's resolv.conf.
    #[command(hide = true)]
    Exec(exec::ExecArgs),
    /// (testbed) one DNS query on an unconnected UDP socket; prints the answer and its source.
    #[command(hide = true)]
    DnsQuery(dns_query::DnsQueryArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Setup => setup(),
        Task::Build { release } => build(release).map(|_| ()),
        Task::Demo { cluster } => setup().and_then(|()| build(false)).and_then(|bin| {
            let this = std::env::current_exe()?;
            if cluster {
                demo_cluster::run(&bin, &this)
            } else {
                demo::run(&bin, &this)
            }
        }),
        Task::Test { args } => setup().and_then(|()| test(&args)),
        Task::Bench { quick, scales } => setup().and_then(|()| build(true)).and_then(|bin| {
            bench::run(&bin, if quick { bench::QUICK } else { bench::FULL }, scales)
        }),
        Task::Probe(args) => probe::run(&args),
        Task::Exec(args) => exec::run(&args),
        Task::DnsQuery(args) => dns_query::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn step(text: &str) {
    eprintln!("==> {text}");
}

/// Checks what lb needs from the machine, saying how to fix what is missing.
fn setup() -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: loading BPF programs and making network namespaces need it");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux); lb needs a kernel built with CONFIG_DEBUG_INFO_BTF"
        );
    }
    lb_agent::cgroup::cgroup2_mount()?;
    // dnsmasq, musl-gcc, busybox and dig: the DNS pod and the resolver clients of the tests;
    // etcd, openssl, xz and nginx: the control-plane tests' etcd, certificates, binaries and Pods.
    let tools = [
        "ip",
        "bpftool",
        "bpf-linker",
        "iptables-restore",
        "dnsmasq",
        "musl-gcc",
        "busybox",
        "dig",
        "etcd",
        "openssl",
        "xz",
        "nginx",
    ];
    for tool in tools {
        if xtask::testbed::find_tool(tool).is_none() {
            bail!("{tool} not found on PATH: run `xtask/run setup`, which installs it");
        }
    }
    Ok(())
}

/// Builds lb-agent and returns the binary's path.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    step(&format!(
        "building lb-agent{} (first build: a few minutes)",
        if release { " (release)" } else { "" }
    ));
    let mut command = cargo();
    command.args(["build", "--package", "lb-agent"]);
    if release {
        command.arg("--release");
    }
    // aya-build relays the eBPF build as warnings; keep them out of the way unless asked.
    if std::env::var_os("LB_VERBOSE_BUILD").is_none() {
        command.arg("--quiet");
    }
    let status = command.status().context("running cargo")?;
    if !status.success() {
        bail!("building lb-agent failed (see above)");
    }
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("lb-agent"))
}

/// Unit tests of every crate, then the end-to-end and control-plane tests, then both demos.
fn test(args: &[String]) -> anyhow::Result<()> {
    let agent = build(false)?;
    let runs: [(&str, &[&str]); 4] = [
        (
            "unit tests",
            &[
                "--package",
                "lb-common",
                "--package",
                "lb-agent",
                "--package",
                "xtask",
                "--lib",
                "--bins",
                "--test",
                "deploy",
                // The bad-input corpus through both sources (lb-agent/tests/bad_input/).
                "--test",
                "bad_input",
            ],
        ),
        (
            // First, so that a testbed fault reads as one rather than as lb's.
            "the testbed's self-check (root: veth namespaces, no lb)",
            &["--package", "xtask", "--test", "testbed_selfcheck"],
        ),
        (
            "end-to-end tests (root: veth namespaces, BPF)",
            &["--package", "xtask", "--test", "e2e"],
        ),
        (
            // Binaries from ../shared/k8s or LB_K8S_BIN_DIR; without them these are ignored,
            // saying how to provide them, except in CI, where that fails.
            "control-plane tests (root: etcd, kube-apiserver, kube-controller-manager, kubectl)",
            &["--package", "xtask", "--test", "cluster"],
        ),
    ];
    for (what, selection) in runs {
        step(&format!("running {what}"));
        let status = cargo()
            .arg("test")
            .args(selection)
            .arg("--")
            .args(args)
            .env("LB_AGENT_BIN", &agent)
            .status()
            .context("running cargo test")?;
        if !status.success() {
            bail!("{what} failed (see above)");
        }
    }
    // The README's first command, so that a change that breaks a demo fails the tests too
    // (not when the run was narrowed to some tests).
    if !args.is_empty() {
        return Ok(());
    }
    // The xtask the tests just built: it replaced this very executable, which runs on deleted.
    let xtask = workspace_root().join("target/debug/xtask");
    step("running the demo (xtask/run demo)");
    demo::run(&agent, &xtask).context("the demo failed")?;
    match xtask::testbed::control_plane::K8sBinaries::locate_for_tests()? {
        Some(_) => {
            step("running the demo on a real control plane (xtask/run demo --cluster)");
            demo_cluster::run(&agent, &xtask).context("the demo on a real control plane failed")?;
        }
        None => step("not running demo --cluster: no control-plane binaries (see above)"),
    }
    Ok(())
}
