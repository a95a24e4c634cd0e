//! One scrape of the agent's `/metrics` (the Prometheus text format), read the way a dashboard
//! would: series by name.

use std::collections::BTreeMap;

use anyhow::{Context as _, bail};

/// The samples of one scrape, by series: `name` or `name{label="value"}` as the agent writes it.
#[derive(Clone, Debug)]
pub struct Metrics {
    samples: BTreeMap<String, f64>,
}

impl Metrics {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The agent writes no timestamps, so the value is the last field.
            let Some((series, value)) = line.rsplit_once(' ') else {
                bail!("not a sample: {line:?}");
            };
            let value: f64 = value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?;
            samples.insert(series.to_owned(), value);
        }
        Ok(Self { samples })
    }

    pub fn get(&self, series: &str) -> anyhow::Result<f64> {
        self.samples
            .get(series)
            .copied()
            .with_context(|| format!("no {series} in /metrics: {:?}", self.samples))
    }

    /// A counter's or a count gauge's value.
    pub fn count(&self, series: &str) -> anyhow::Result<u64> {
        Ok(self.get(series)? as u64)
    }

    /// The sum of every series of metric `name`, whatever their labels (a dashboard's
    /// `sum(name)`); an error when there is none.
    pub fn sum(&self, name: &str) -> anyhow::Result<u64> {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| *value)
            .collect();
        anyhow::ensure!(
            !values.is_empty(),
            "no {name} in /metrics: {:?}",
            self.samples
        );
        Ok(values.iter().sum::<f64>() as u64)
    }

    /// `lb_syncs_total`: syncs of the maps with the model so far.
    pub fn syncs(&self) -> anyhow::Result<u64> {
        self.count("lb_syncs_total")
    }

    /// When the last sync finished writing the maps, in µs since the Unix epoch (the probe's
    /// clock: [`super::probe::now_us`]).
    pub fn last_sync_us(&self) -> anyhow::Result<u64> {
        Ok((self.get("lb_last_sync_timestamp_seconds")? * 1e6).round() as u64)
    }

    /// How long a phase (`read`, `model`, `apply`) of the last sync took, in milliseconds.
    pub fn last_sync_ms(&self, phase: &str) -> anyhow::Result<f64> {
        Ok(self.get(&format!(
            "lb_last_sync_duration_seconds{{phase=\"{phase}\"}}"
        ))? * 1e3)
    }

    /// Frontends written to the maps so far: added, updated, removed.
    pub fn frontend_writes(&self) -> anyhow::Result<[u64; 3]> {
        let writes =
            |change| self.count(&format!("lb_frontend_writes_total{{change=\"{change}\"}}"));
        Ok([writes("added")?, writes("updated")?, writes("removed")?])
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use lb_agent::{
        dataplane::ApplyReport,
        metrics::{Metrics as AgentMetrics, SyncPhases},
    };

    use super::*;

    /// The reader understands what the agent writes.
    #[test]
    fn reads_the_agents_own_exposition() {
        let agent = AgentMetrics::new();
        agent.sync(
            SyncPhases {
                read: Duration::from_micros(2_500),
                model: Duration::from_micros(700),
                apply: Duration::from_micros(40_000),
            },
            UNIX_EPOCH + Duration::from_micros(1_764_151_234_567_891),
        );
        agent.apply(&ApplyReport {
            added: 2,
            updated: 1,
            ..Default::default()
        });
        let m = Metrics::parse(&agent.encode()).unwrap();
        assert_eq!(m.syncs().unwrap(), 1);
        assert_eq!(m.last_sync_us().unwrap(), 1_764_151_234_567_891);
        assert!((m.last_sync_ms("read").unwrap() - 2.5).abs() < 1e-9);
        assert!((m.last_sync_ms("apply").unwrap() - 40.0).abs() < 1e-9);
        assert_eq!(m.frontend_writes().unwrap(), [2, 1, 0]);
        assert_eq!(m.sum("lb_write_failures_total").unwrap(), 0);
        assert_eq!(
            m.sum("lb_frontends").unwrap(),
            0,
            "lb_frontends_failing is another metric"
        );
        assert!(m.get("lb_no_such_metric").is_err());
    }

    #[test]
    fn a_line_that_is_not_a_sample_is_an_error() {
        assert!(Metrics::parse("lb_syncs_total\n").is_err());
        assert!(Metrics::parse("lb_syncs_total many\n").is_err());
    }
}
