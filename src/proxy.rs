//! What the pure core asks of the proxy, as one trait: shared data (read, and
//! write by compare-and-swap), dispatching an HTTP call, logging and stats. The
//! glue (`filter/`) implements it over the proxy-wasm host; native tests use an
//! in-memory one. Time is never read through it: it comes in as an argument.

use crate::credential::store::HttpCall;

/// A host status other than Ok, as the ABI numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFault(pub u32);

impl HostFault {
    /// Shared data changed since it was read (a CAS mismatch).
    pub const CAS_MISMATCH: u32 = 8;
}

impl std::fmt::Display for HostFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            1 => "NotFound",
            2 => "BadArgument",
            3 => "SerializationFailure",
            4 => "ParseFailure",
            5 => "BadExpression",
            6 => "InvalidMemoryAccess",
            7 => "Empty",
            8 => "CasMismatch",
            9 => "ResultMismatch",
            10 => "InternalFailure",
            11 => "BrokenConnection",
            12 => "Unimplemented",
            _ => return write!(f, "status {}", self.0),
        };
        f.write_str(name)
    }
}

#[derive(Debug, Clone, Copy, PartialOrd, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MetricKind {
    Counter = 0,
    Gauge = 1,
}

pub trait Proxy {
    /// A shared-data value and its CAS token; `None` when the key doesn't exist.
    fn shared_get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, HostFault>;
    /// Writes a shared-data value if its CAS token is still `cas` (0: always);
    /// `Ok(false)` when another writer came first.
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<bool, HostFault>;
    /// Sends a call through an Envoy cluster; its id, which its answer comes back with.
    fn dispatch(&self, call: &HttpCall) -> Result<u32, HostFault>;
    fn log(&self, level: Level, message: &str);
    /// Whether a message at `level` would be written (skip formatting otherwise).
    fn log_enabled(&self, level: Level) -> bool;
    /// Defines a stat; `None` when the host refuses (then it isn't counted).
    fn define(&self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Counts one on a counter.
    fn count(&self, id: Option<u32>);
    /// Sets a gauge.
    fn record(&self, id: Option<u32>, value: u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_statuses_are_named_as_the_abi_names_them() {
        let names: Vec<String> = (0..14).map(|c| HostFault(c).to_string()).collect();
        assert_eq!(
            names,
            [
                "status 0",
                "NotFound",
                "BadArgument",
                "SerializationFailure",
                "ParseFailure",
                "BadExpression",
                "InvalidMemoryAccess",
                "Empty",
                "CasMismatch",
                "ResultMismatch",
                "InternalFailure",
                "BrokenConnection",
                "Unimplemented",
                "status 13"
            ]
        );
        assert_eq!(HostFault::CAS_MISMATCH, 8);
    }
}
