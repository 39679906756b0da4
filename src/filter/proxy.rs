//! [`Proxy`] over the proxy-wasm host, and the counts a VM keeps until its tick
//! hands them to Envoy (a host call per count would cost every request).

use std::cell::RefCell;

use super::host::{self, HostError};
use crate::credential::store::HttpCall;
use crate::proxy::{HostFault, Level, MetricKind, Proxy};

/// The host, as the pure core sees it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyHost;

thread_local! {
    /// Counts not yet handed to Envoy, by stat id (one VM is one thread). A
    /// request counts a few stats, and a VM between ticks a few dozen: a short
    /// list searched from its end beats hashing the id on every count.
    static PENDING: RefCell<Vec<(u32, i64)>> = const { RefCell::new(Vec::new()) };
}

impl Proxy for ProxyHost {
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostFault> {
        host::shared_data(key)
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<bool, HostFault> {
        match host::set_shared_data(key, value, cas) {
            Ok(()) => Ok(true),
            Err(HostError(HostFault::CAS_MISMATCH)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn dispatch(&self, call: &HttpCall) -> Result<u32, HostFault> {
        host::dispatch_http_call(call)
    }

    fn log(&self, level: Level, message: &str) {
        host::log(level, message)
    }

    fn log_enabled(&self, level: Level) -> bool {
        host::log_enabled(level)
    }

    fn define(&self, kind: MetricKind, name: &str) -> Option<u32> {
        host::define_metric(kind, name).ok()
    }

    /// Counts one, in the VM: the count reaches Envoy at the next [`flush`]
    /// (every tick, at most a second later), not with a host call per request.
    fn count(&self, id: Option<u32>) {
        let Some(id) = id else { return };
        let counted = PENDING.with(|p| match p.try_borrow_mut() {
            Ok(mut p) => {
                match p.iter_mut().rev().find(|(i, _)| *i == id) {
                    Some((_, n)) => *n += 1,
                    None => p.push((id, 1)),
                }
                true
            }
            Err(_) => false,
        });
        if !counted {
            // A stat that can't be counted is not worth failing a request over.
            let _ = host::increment_metric(id, 1);
        }
    }

    fn record(&self, id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = host::record_metric(id, value);
        }
    }
}

/// Hands the counts kept in this VM to Envoy.
pub fn flush() {
    let counts = PENDING.with(|p| {
        p.try_borrow_mut().map(|mut p| {
            let counts = p.clone();
            p.clear(); // keeps its capacity for the next tick's counts
            counts
        })
    });
    for (id, n) in counts.unwrap_or_default() {
        let _ = host::increment_metric(id, n);
    }
}
