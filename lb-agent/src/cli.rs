//! The command line: `lb-agent run`, `list` and `reset`, and their flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

#[derive(Parser)]
#[command(version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How log lines are written to stderr: `text` for people, `json` (one object per line, with
    /// the same fields: timestamp, level, target, message and the event's own) for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LB_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Address for /healthz, /readyz and /metrics (Prometheus). The default port is not one of
    /// kube-proxy's (10256 for health, 10249 for metrics), so both can run on a hostNetwork node
    /// during a migration.
    #[arg(long, default_value = "0.0.0.0:10266")]
    pub health_addr: SocketAddr,
    /// Capacity of each per-socket map (LRU): the translations that let UDP replies and
    /// getpeername show the ClusterIP, and the backend each unconnected UDP socket keeps per
    /// Service. When full, the least recently used entry goes: a reply for it shows the Pod IP.
    /// About 100 bytes of kernel memory per entry and map.
    #[arg(long, default_value_t = lb_common::DEFAULT_SOCKET_MAP_ENTRIES, value_name = "N")]
    pub socket_map_entries: u32,
    /// Entries of each session affinity LRU map (IPv4 and IPv6): one per client (network
    /// namespace) and frontend with `sessionAffinity: ClientIP`. When full, the least recently
    /// used goes, and that client picks anew at its next connect. About 100 bytes of kernel
    /// memory per entry and map.
    #[arg(long, default_value_t = lb_common::DEFAULT_AFFINITY_MAP_ENTRIES, value_name = "N")]
    pub affinity_map_entries: u32,
    /// End the sockets lb translated to a backend when it leaves the Service's set (it became
    /// not ready, or was removed), so that their applications connect again, to a live backend:
    /// TCP and connected UDP, in every network namespace of the cgroup (Linux >= 6.5). With
    /// false, such sockets stay connected until their applications close them, as with
    /// kube-proxy.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub destroy_sockets: bool,
    /// Also export the programs' counters per Service port on /metrics (`lb_service_*_total`
    /// with namespace, service and port labels): a series per Service port and counter, so off
    /// by default; the sums over all Services are always exported.
    #[arg(long)]
    pub metrics_per_service: bool,
    /// How often the pinned maps are compared with the wanted state: an entry changed or deleted
    /// behind the agent's back (with bpftool, say) is repaired within one interval, and
    /// frontends that failed to program are retried.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
    /// How often to check the manifests for changes.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}
