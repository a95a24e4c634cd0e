//! lb-agent: programs lb's eBPF load balancer from Kubernetes Services and EndpointSlices.
//!
//! A library with a thin binary (`main.rs`), so that xtask's testbed, benchmarks and end-to-end
//! tests use the agent's own types: the `list` JSON schema ([`list::Listing`]), cgroup discovery
//! ([`cgroup::cgroup2_mount`]) and the BPF filesystem mount ([`dataplane::bpf::mount_bpffs`]).

pub mod cgroup;
pub mod cli;
pub mod dataplane;
pub mod health;
pub mod list;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod run;
pub mod source;

pub use cli::{OutputFormat, RunArgs};
