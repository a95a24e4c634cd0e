//! `lb-agent list`: what the pinned maps hold, one row per frontend.
//!
//! JSON schema (`-o json`), stable:
//! `{"layout_version", "frontends": [{"service": {"namespace", "name", "port"}, "frontend":
//! {"address", "port", "protocol"}, "backends": [{"address", "port"}]}]}`, where
//! `layout_version` is the version of the maps' layout the node runs (lb-common's
//! `LAYOUT_VERSION`; absent from the output of agents older than versioned layouts),
//! `service.port` is the Service port's name ("" when unnamed), `protocol` is TCP, UDP or SCTP,
//! and backends are in slot order. The table ends with a line naming the layout version.

use std::{io::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use lb_common::LAYOUT_VERSION;

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
    let rows = view(&maps.snapshot()?);
    for row in rows.iter().filter(|r| r.missing_slots > 0) {
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

fn to_json(rows: &[FrontendView]) -> Listing {
    Listing {
        layout_version: Some(LAYOUT_VERSION),
        frontends: rows
            .iter()
            .map(|r| Row {
                service: ServiceJson {
                    namespace: r.service.namespace.clone(),
                    name: r.service.name.clone(),
                    port: r.service.port.clone(),
                },
                frontend: frontend_json(&r.frontend),
                backends: r.backends.iter().map(backend_json).collect(),
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

fn table(rows: &[FrontendView]) -> String {
    let cells: Vec<[String; 3]> = rows
        .iter()
        .map(|r| {
            let backends = if r.backends.is_empty() {
                "<none: connects refused>".to_owned()
            } else {
                r.backends
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            [r.service.to_string(), r.frontend.to_string(), backends]
        })
        .collect();
    let header = [
        "SERVICE".to_owned(),
        "FRONTEND".to_owned(),
        "BACKENDS".to_owned(),
    ];
    let width = |i: usize| {
        std::iter::once(&header)
            .chain(&cells)
            .map(|c| c[i].len())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1) = (width(0), width(1));
    std::iter::once(&header)
        .chain(&cells)
        .map(|[a, b, c]| format!("{a:w0$}  {b:w1$}  {c}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServicePortName};

    fn rows() -> Vec<FrontendView> {
        vec![
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
                missing_slots: 0,
            },
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
                missing_slots: 0,
            },
        ]
    }

    #[test]
    fn table_has_one_aligned_row_per_frontend() {
        assert_eq!(
            table(&rows()),
            "SERVICE        FRONTEND           BACKENDS\n\
             shop/web:http  10.96.0.10:80/TCP  10.244.0.1:8080, 10.244.0.2:8080\n\
             shop/empty     10.96.0.11:53/UDP  <none: connects refused>\n"
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
                ]
            })
        );
        assert_eq!(json["frontends"][1]["backends"], serde_json::json!([]));
    }
}
