//! lb-agent: programs lb's eBPF load balancer from Kubernetes Services and EndpointSlices.

mod cgroup;
mod dataplane;
mod health;
mod list;
mod model;
mod run;
mod source;

use std::{io::IsTerminal as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, then keep its maps in step with the Services and
    /// EndpointSlices of the Kubernetes API (or of --manifests). On SIGTERM the datapath stays in
    /// place and keeps serving.
    Run(RunArgs),
    /// Show what the datapath holds: one row per frontend (reads the pinned maps; no agent needed).
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
        pin_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Table)]
        output: OutputFormat,
    },
    /// Remove the datapath: detach the program and delete the pinned maps. Connects to
    /// ClusterIPs are no longer rewritten afterwards.
    Reset {
        #[arg(long, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Serve the Services and EndpointSlices in this manifest file or directory (re-read whenever
    /// a file changes) instead of following the Kubernetes API.
    #[arg(long, value_name = "FILE|DIR")]
    pub manifests: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API. Default: KUBECONFIG, ~/.kube/config, or the in-cluster
    /// service account.
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: for internalTrafficPolicy: Local, and to find its zone (the Node's
    /// topology.kubernetes.io/zone label) for topology hints. Set it from the downward API.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Also serve Services labelled service.kubernetes.io/service-proxy-name with this value
    /// (Services labelled with any other value belong to another proxy).
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// cgroup v2 directory whose processes (and descendants) get load-balanced connects.
    /// Default: the root of the system's cgroup v2 hierarchy.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Where the maps and the program's link are pinned (on a BPF filesystem).
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "LB_PIN_DIR")]
    pub pin_dir: PathBuf,
    /// Address for /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub health_addr: SocketAddr,
    /// Capacity of each per-socket map (LRU): the translations that let UDP replies and
    /// getpeername show the ClusterIP, and the backend each unconnected UDP socket keeps per
    /// Service. When full, the least recently used entry goes: a reply for it shows the Pod IP.
    /// About 100 bytes of kernel memory per entry and map.
    #[arg(long, default_value_t = lb_common::DEFAULT_SOCKET_MAP_ENTRIES, value_name = "N")]
    pub socket_map_entries: u32,
    /// How often to check the manifests for changes.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| text.split_at(i))
        .unwrap_or((text, "ms"));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration like 100ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        _ => Err(format!("{text:?}: unit must be ms or s")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::List { pin_dir, output } => list::list(&pin_dir, output),
        Command::Reset { pin_dir } => dataplane::bpf::reset(&pin_dir).map(|removed| {
            if removed.is_empty() {
                eprintln!("nothing to remove under {}", pin_dir.display());
            }
            for path in removed {
                eprintln!("removed {}", path.display());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
