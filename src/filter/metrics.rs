//! Envoy stats latchkey defines (as `wasmcustom.<name>` in `/stats`, and without
//! that prefix, dots as underscores, in Prometheus output). The same name in
//! every VM is one stat, so counts are proxy-wide.

use super::host::{self, Level, MetricKind};
use crate::config::Config;

/// Counter ids; `None` where the host refused to define one (then not counted).
#[derive(Debug, Default)]
pub struct Metrics {
    pub allowed: Option<u32>,
    pub unmatched: Option<u32>,
    pub denied_unauthenticated: Option<u32>,
    pub denied_forbidden: Option<u32>,
    pub denied_unmatched: Option<u32>,
    pub denied_bad_claims: Option<u32>,
    pub unavailable: Option<u32>,
    pub internal_errors: Option<u32>,
    /// `latchkey.connection.<name>.injected`, by connection index.
    pub injected: Vec<Option<u32>>,
}

fn counter(name: &str) -> Option<u32> {
    match host::define_metric(MetricKind::Counter, name) {
        Ok(id) => Some(id),
        Err(e) => {
            host::log(Level::Warn, &format!("can't define stat {name}: {e}"));
            None
        }
    }
}

/// A name safe to put in a stat name: `[A-Za-z0-9_-]`, anything else as `_`.
pub fn stat_segment(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Metrics {
    pub fn define(config: &Config) -> Metrics {
        Metrics {
            allowed: counter("latchkey.requests.allowed"),
            unmatched: counter("latchkey.requests.unmatched"),
            denied_unauthenticated: counter("latchkey.requests.denied.unauthenticated"),
            denied_forbidden: counter("latchkey.requests.denied.forbidden"),
            denied_unmatched: counter("latchkey.requests.denied.unmatched"),
            denied_bad_claims: counter("latchkey.requests.denied.bad_claims"),
            unavailable: counter("latchkey.requests.unavailable"),
            internal_errors: counter("latchkey.requests.internal_error"),
            injected: config
                .connections
                .iter()
                .map(|c| {
                    counter(&format!(
                        "latchkey.connection.{}.injected",
                        stat_segment(&c.name)
                    ))
                })
                .collect(),
        }
    }

    pub fn inc(id: Option<u32>) {
        if let Some(id) = id {
            // A stat that can't be counted is not worth failing a request over.
            let _ = host::increment_metric(id, 1);
        }
    }

    pub fn injected(&self, connection: usize) {
        Self::inc(self.injected.get(connection).copied().flatten());
    }
}
