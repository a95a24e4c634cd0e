//! Log lines on stderr, as text or as JSON (`--log-format`), filtered by `RUST_LOG` (default
//! `info`).

use std::io::IsTerminal as _;

use tracing::Subscriber;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

use crate::cli::LogFormat;

/// Sets the process's logger.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    tracing::subscriber::set_global_default(subscriber(format, filter, std::io::stderr, ansi))
        .expect("the logger is set once, first thing");
}

/// A logger of `format` writing to `writer`. In JSON, each line is one object whose top-level
/// keys are `timestamp`, `level`, `target`, `message` and the event's fields, as the text format
/// shows them.
fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the logger writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_one(format: LogFormat) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let logger = subscriber(
            format,
            EnvFilter::new("info"),
            move || writer.clone(),
            false,
        );
        tracing::subscriber::with_default(logger, || {
            tracing::info!(frontends = 3, service = "demo/web:http", "dataplane synced");
            tracing::debug!("below the filter");
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn json_lines_carry_the_same_fields_as_text() {
        let text = log_one(LogFormat::Text);
        assert!(
            text.contains("INFO")
                && text.contains("dataplane synced frontends=3 service=\"demo/web:http\""),
            "{text}"
        );

        let json = log_one(LogFormat::Json);
        assert_eq!(
            json.lines().count(),
            1,
            "one line per event, none below the filter"
        );
        let line: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["message"], "dataplane synced");
        assert_eq!(line["frontends"], 3);
        assert_eq!(line["service"], "demo/web:http");
        assert_eq!(line["target"], "lb_agent::logging::tests");
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.contains('T')),
            "{line}"
        );
    }
}
