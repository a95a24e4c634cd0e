//! `lb-agent list`: what the pinned maps hold, one row per frontend.
//!
//! JSON schema (`-o json`), stable:
//! `{"layout_version", "frontends": [{"service": {"namespace", "name", "port"}, "frontend":
//! {"address", "port", "protocol"}, "backends": [{"address", "port"}], "counters": {"connects",
//! "refused", "datagrams", "affinity_hits", "sockets_destroyed"}}]}`, where `layout_version` is
//! the version of the maps' layout the node runs (lb-common's `LAYOUT_VERSION`; absent from the
//! output of agents older than versioned layouts), `service.port` is the Service port's name (""
//! when unnamed), `protocol` is TCP, UDP or SCTP, backends are in slot order, and `counters` are
//! what the programs counted for the frontend since it was programmed (lb-common's
//! `ServiceCounters`; absent from the output of agents older than layout version 3). The table
//! ends with a line naming the layout version.

use std::{io::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use lb_common::{LAYOUT_VERSION, ServiceCounters};

use crate::{
    OutputFormat,
    dataplane::{
        FrontendView, MapStore,
        bpf::{BpfMaps, layout_dir},
        view,
    },
    model::{Backend, Frontend},
};

/// The `-o json` document; xtask's tests read it with these types too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_version: Option<u32>,
    pub frontends: Vec<Row>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub service: ServiceJson,
    pub frontend: FrontendJson,
    pub backends: Vec<BackendJson>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<CountersJson>,
}

/// A frontend's counters, summed over the CPUs (lb-common's `ServiceCounters`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersJson {
    pub connects: u64,
    pub refused: u64,
    pub datagrams: u64,
    pub affinity_hits: u64,
    pub sockets_destroyed: u64,
}

impl From<ServiceCounters> for CountersJson {
    fn from(c: ServiceCounters) -> Self {
        Self {
            connects: c.connects,
            refused: c.refused,
            datagrams: c.datagrams,
            affinity_hits: c.affinity_hits,
            sockets_destroyed: c.sockets_destroyed,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceJson {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendJson {
    pub address: String,
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendJson {
    pub address: String,
    pub port: u16,
}

pub fn list(pin_dir: &Path, format: OutputFormat) -> anyhow::Result<()> {
    let maps = BpfMaps::open_pinned(pin_dir)?;
    let rows: Vec<(FrontendView, Option<CountersJson>)> = view(&maps.snapshot()?)
        .into_iter()
        .map(|row| {
            let counters = Some(maps.counters(row.service_id)?.into());
            anyhow::Ok((row, counters))
        })
        .collect::<Result<_, _>>()?;
    for (row, _) in rows.iter().filter(|(r, _)| r.missing_slots > 0) {
        eprintln!(
            "warning: {} lacks {} backend slot(s); the running agent repairs this on its next sync",
            row.frontend, row.missing_slots
        );
    }
    let text = match format {
        OutputFormat::Json => serde_json::to_string_pretty(&to_json(&rows))? + "\n",
        OutputFormat::Table => {
            table(&rows)
                + &format!(
                    "(maps of layout version {LAYOUT_VERSION}, pinned under {})\n",
                    layout_dir(pin_dir, LAYOUT_VERSION).display()
                )
        }
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn to_json(rows: &[(FrontendView, Option<CountersJson>)]) -> Listing {
    Listing {
        layout_version: Some(LAYOUT_VERSION),
        frontends: rows
            .iter()
            .map(|(r, counters)| Row {
                service: ServiceJson {
                    namespace: r.service.namespace.clone(),
                    name: r.service.name.clone(),
                    port: r.service.port.clone(),
                },
                frontend: frontend_json(&r.frontend),
                backends: r.backends.iter().map(backend_json).collect(),
                counters: *counters,
            })
            .collect(),
    }
}

fn frontend_json(f: &Frontend) -> FrontendJson {
    FrontendJson {
        address: f.address.to_string(),
        port: f.port,
        protocol: f.protocol.as_str().to_owned(),
    }
}

fn backend_json(b: &Backend) -> BackendJson {
    BackendJson {
        address: b.address.to_string(),
        port: b.port,
    }
}

/// One row per frontend: the Service port, the frontend, its counters (empty while it has none)
/// and its backends (last: the longest).
fn table(rows: &[(FrontendView, Option<CountersJson>)]) -> String {
    const HEADER: [&str; 8] = [
        "SERVICE",
        "FRONTEND",
        "CONNECTS",
        "DATAGRAMS",
        "REFUSED",
        "AFFINITY",
        "DESTROYED",
        "BACKENDS",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(r, counters)| {
            let backends = if r.backends.is_empty() {
                "<none: connects refused>".to_owned()
            } else {
                r.backends
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let count = |field: fn(&CountersJson) -> u64| {
                counters
                    .as_ref()
                    .map_or(String::new(), |c| field(c).to_string())
            };
            vec![
                r.service.to_string(),
                r.frontend.to_string(),
                count(|c| c.connects),
                count(|c| c.datagrams),
                count(|c| c.refused),
                count(|c| c.affinity_hits),
                count(|c| c.sockets_destroyed),
                backends,
            ]
        })
        .collect();
    let header: Vec<String> = HEADER.iter().map(|h| (*h).to_owned()).collect();
    let width = |i: usize| {
        std::iter::once(&header)
            .chain(&cells)
            .map(|c| c[i].len())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..HEADER.len()).map(width).collect();
    std::iter::once(&header)
        .chain(&cells)
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let w = widths[i];
                match i {
                    // Names left-aligned, counts right-aligned, backends unpadded.
                    0 | 1 => line.push_str(&format!("{cell:w$}  ")),
                    i if i + 1 < row.len() => line.push_str(&format!("{cell:>w$}  ")),
                    _ => line.push_str(cell),
                }
            }
            line + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};

    fn rows() -> Vec<(FrontendView, Option<CountersJson>)> {
        vec![
            (
                FrontendView {
                    service: ServicePortName {
                        namespace: "shop".into(),
                        name: "web".into(),
                        port: "http".into(),
                    },
                    frontend: Frontend {
                        address: "10.96.0.10".parse().unwrap(),
                        port: 80,
                        protocol: Protocol::Tcp,
                    },
                    backends: vec![
                        Backend {
                            address: "10.244.0.1".parse().unwrap(),
                            port: 8080,
                        },
                        Backend {
                            address: "10.244.0.2".parse().unwrap(),
                            port: 8080,
                        },
                    ],
                    service_id: 1,
                    missing_slots: 0,
                },
                Some(CountersJson {
                    connects: 1200,
                    refused: 0,
                    datagrams: 0,
                    affinity_hits: 3,
                    sockets_destroyed: 1,
                }),
            ),
            (
                FrontendView {
                    service: ServicePortName {
                        namespace: "shop".into(),
                        name: "empty".into(),
                        port: String::new(),
                    },
                    frontend: Frontend {
                        address: "10.96.0.11".parse().unwrap(),
                        port: 53,
                        protocol: Protocol::Udp,
                    },
                    backends: vec![],
                    service_id: 2,
                    missing_slots: 0,
                },
                Some(CountersJson {
                    refused: 5,
                    ..Default::default()
                }),
            ),
        ]
    }

    #[test]
    fn table_has_one_aligned_row_per_frontend() {
        assert_eq!(
            table(&rows()),
            "SERVICE        FRONTEND           CONNECTS  DATAGRAMS  REFUSED  AFFINITY  DESTROYED  \
             BACKENDS\n\
             shop/web:http  10.96.0.10:80/TCP      1200          0        0         3          1  \
             10.244.0.1:8080, 10.244.0.2:8080\n\
             shop/empty     10.96.0.11:53/UDP         0          0        5         0          0  \
             <none: connects refused>\n"
        );
    }

    #[test]
    fn json_follows_the_documented_schema() {
        let json = serde_json::to_value(to_json(&rows())).unwrap();
        assert_eq!(
            json["frontends"][0],
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web", "port": "http"},
                "frontend": {"address": "10.96.0.10", "port": 80, "protocol": "TCP"},
                "backends": [
                    {"address": "10.244.0.1", "port": 8080},
                    {"address": "10.244.0.2", "port": 8080}
                ],
                "counters": {
                    "connects": 1200, "refused": 0, "datagrams": 0, "affinity_hits": 3,
                    "sockets_destroyed": 1
                }
            })
        );
        assert_eq!(json["frontends"][1]["backends"], serde_json::json!([]));
    }
}
