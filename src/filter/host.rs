//! The proxy-wasm host calls latchkey makes, as functions that return `Result`
//! for every status the host can give.
//!
//! The SDK's `proxy_wasm::hostcalls` return `Result` too, but `panic!` on any
//! status they don't expect (e.g. `set_property`, `send_http_response`,
//! `get_header_map_value` on anything but Ok/NotFound), and its logger
//! `unwrap`s; a panic aborts the worker's VM. So the request path uses these
//! bindings to the same ABI (0.2.1) functions instead. The SDK still provides the
//! context dispatch and the memory allocator the host calls back into.

use std::time::Duration;

use crate::credential::store::HttpCall;
use crate::pairs;

/// A host status other than Ok, as the ABI numbers it.
pub use crate::proxy::HostFault as HostError;

pub const NOT_FOUND: u32 = 1;

pub type HostResult<T> = Result<T, HostError>;

#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Map {
    /// The request headers.
    Request = 0,
    /// The response headers.
    Response = 2,
    /// The headers of a dispatched call's response.
    CallResponse = 6,
}

pub use crate::proxy::{Level, MetricKind};

const BUFFER_HTTP_CALL_RESPONSE_BODY: u32 = 4;
const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

#[allow(clashing_extern_declarations)]
#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_log_level(return_level: *mut u32) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_set_effective_context(context_id: u32) -> u32;
    fn proxy_continue_stream(stream_type: u32) -> u32;
}

fn status(code: u32) -> HostResult<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(HostError(code))
    }
}

/// Takes ownership of a buffer the host allocated through the SDK's
/// `proxy_on_memory_allocate` (a boxed slice of exactly `size` bytes).
///
/// # Safety
/// `data` must be null or come from that allocator with `size` bytes.
unsafe fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, size, size)
    }
}

/// Logs a message; a failure to log is ignored (there is nowhere to report it).
pub fn log(level: Level, message: &str) {
    // SAFETY: pointer and length of a live &str.
    unsafe {
        proxy_log(level as u32, message.as_ptr(), message.len());
    }
}

thread_local! {
    /// The host's log level, and how many more checks may use it before asking again.
    static LOG_LEVEL: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// Whether messages at `level` would be written: skip formatting otherwise. The
/// level is asked of the host once per 1024 checks (a host call costs as much as
/// the rest of a request's logging decision), so a log-level change through the
/// admin API takes effect within that many requests.
pub fn log_enabled(level: Level) -> bool {
    let (mut current, left) = LOG_LEVEL.with(std::cell::Cell::get);
    if left == 0 {
        let mut fresh = 0u32;
        // SAFETY: the host writes one u32.
        let code = unsafe { proxy_get_log_level(&mut fresh) };
        current = if code == 0 { fresh } else { 0 };
        LOG_LEVEL.with(|c| c.set((current, 1024)));
    } else {
        LOG_LEVEL.with(|c| c.set((current, left - 1)));
    }
    current <= level as u32
}

/// The plugin configuration (`configuration` in Envoy, `pluginConfig` in Istio).
pub fn plugin_configuration() -> HostResult<Vec<u8>> {
    buffer(BUFFER_PLUGIN_CONFIGURATION, usize::MAX)
}

/// The body of the HTTP call response being delivered (at most `max` bytes).
pub fn http_call_response_body(max: usize) -> HostResult<Vec<u8>> {
    buffer(BUFFER_HTTP_CALL_RESPONSE_BODY, max)
}

fn buffer(kind: u32, max: usize) -> HostResult<Vec<u8>> {
    let mut data = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: out-pointers to locals; the buffer is then owned.
    let code = unsafe { proxy_get_buffer_bytes(kind, 0, max, &mut data, &mut size) };
    match code {
        0 => Ok(unsafe { owned(data, size) }),
        NOT_FOUND => Ok(Vec::new()),
        other => Err(HostError(other)),
    }
}

/// Shared data (process-wide per vm_id): the value and its CAS token, or
/// `None` when the key doesn't exist.
pub fn shared_data(key: &str) -> HostResult<Option<(Vec<u8>, u32)>> {
    let mut data = std::ptr::null_mut();
    let mut size = 0usize;
    let mut cas = 0u32;
    // SAFETY: pointer and length of a live &str; out-pointers to locals.
    let code =
        unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    match code {
        0 => Ok(Some((unsafe { owned(data, size) }, cas))),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

/// Writes shared data if its CAS token is still `cas` (0: unconditionally).
/// `Err(HostError(CAS_MISMATCH))` when another writer came first.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> HostResult<()> {
    // SAFETY: pointers and lengths of live buffers.
    status(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// The root context's tick period (from any context: the host applies it to the root).
pub fn set_tick_period_ms(ms: u32) -> HostResult<()> {
    // SAFETY: plain value.
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> HostResult<u64> {
    Ok(now_ns()? / 1_000_000)
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn now_ns() -> HostResult<u64> {
    let mut ns = 0u64;
    // SAFETY: the host writes one u64.
    status(unsafe { proxy_get_current_time_nanoseconds(&mut ns) })?;
    Ok(ns)
}

/// Makes later host calls act on `context_id` (to resume or answer a paused request
/// from the root context). Fails for a context that has gone away.
pub fn set_effective_context(context_id: u32) -> HostResult<()> {
    // SAFETY: plain value.
    status(unsafe { proxy_set_effective_context(context_id) })
}

/// Resumes the paused request of the effective context.
pub fn resume_request() -> HostResult<()> {
    // SAFETY: plain value (stream type 0: request).
    status(unsafe { proxy_continue_stream(0) })
}

/// All headers of a map, as one buffer in the pairs encoding.
pub struct HeaderPairs(Vec<u8>);

impl HeaderPairs {
    /// The pairs, decoded once; names as `&str` (Envoy's header names are
    /// tokens), values as bytes. A buffer that isn't the pairs encoding is a
    /// host fault (the request fails closed).
    pub fn pairs(&self) -> HostResult<Vec<(&str, &[u8])>> {
        if self.0.is_empty() {
            return Ok(Vec::new());
        }
        pairs::decode_with(&self.0, |k, v| Some((crate::text::utf8(k)?, v))).ok_or(HostError(3))
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let pairs = self.pairs().ok()?;
        pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
    }
}

pub fn header_pairs(map: Map) -> HostResult<HeaderPairs> {
    let mut data = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: out-pointers to locals; the buffer is then owned.
    status(unsafe { proxy_get_header_map_pairs(map as u32, &mut data, &mut size) })?;
    // Checked when decoded ([`HeaderPairs::pairs`]): once per request.
    Ok(HeaderPairs(unsafe { owned(data, size) }))
}

/// One header's value; `Ok(None)` when the map has no such header.
pub fn header(map: Map, name: &str) -> HostResult<Option<Vec<u8>>> {
    let mut data = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: pointer and length of a live &str, out-pointers to locals.
    let code = unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
    };
    match code {
        0 => Ok(Some(unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

pub fn remove_header(map: Map, name: &str) -> HostResult<()> {
    // SAFETY: pointer and length of a live &str.
    status(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

pub fn replace_header(map: Map, name: &str, value: &[u8]) -> HostResult<()> {
    // SAFETY: pointers and lengths of live slices.
    status(unsafe {
        proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Property path segments joined by NUL, with none after the last: Envoy uses
/// the bytes as they are for `set_property` keys (`wasm.<path>`).
fn property_path<'a>(path: &[&'a str]) -> std::borrow::Cow<'a, [u8]> {
    match path {
        // One segment (`metadata`, filter state): its bytes, no copy per request.
        [one] => std::borrow::Cow::Borrowed(one.as_bytes()),
        _ => std::borrow::Cow::Owned(path.join("\0").into_bytes()),
    }
}

/// A property; `Ok(None)` when the host has none at that path.
pub fn property(path: &[&str]) -> HostResult<Option<Vec<u8>>> {
    let p = property_path(path);
    let mut data = std::ptr::null_mut();
    let mut size = 0usize;
    // SAFETY: pointer and length of a live Vec, out-pointers to locals.
    let code = unsafe { proxy_get_property(p.as_ptr(), p.len(), &mut data, &mut size) };
    match code {
        0 => Ok(Some(unsafe { owned(data, size) })),
        NOT_FOUND => Ok(None),
        other => Err(HostError(other)),
    }
}

/// Sets filter state (from an HTTP context: `wasm.<name>`).
pub fn set_property(path: &[&str], value: &[u8]) -> HostResult<()> {
    let p = property_path(path);
    // SAFETY: pointers and lengths of live buffers.
    status(unsafe { proxy_set_property(p.as_ptr(), p.len(), value.as_ptr(), value.len()) })
}

pub fn send_local_response(
    status_code: u32,
    details: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HostResult<()> {
    let items: Vec<(&[u8], &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
        .collect();
    let h = pairs::encode(&items);
    // SAFETY: pointers and lengths of live buffers.
    status(unsafe {
        proxy_send_local_response(
            status_code,
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            h.as_ptr(),
            h.len(),
            -1,
        )
    })
}

/// Sends a call through an Envoy cluster from the active context (the root:
/// the answer comes back to it); the call's id. This one goes through the SDK,
/// whose dispatcher must register the id to route the answer back (an answer
/// it doesn't know panics in the SDK); the SDK panics on a status other than
/// Ok, BadArgument and InternalFailure, the only ones Envoy's `httpCall`
/// returns.
pub fn dispatch_http_call(call: &HttpCall) -> HostResult<u32> {
    let mut headers: Vec<(&str, &str)> =
        call.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for (k, v) in &call.secret_headers {
        headers.push((k, v.expose()));
    }
    proxy_wasm::hostcalls::dispatch_http_call(
        &call.cluster,
        headers,
        call.body.as_ref().map(|b| b.expose().as_bytes()),
        vec![],
        Duration::from_millis(call.timeout_ms),
    )
    .map_err(|status| HostError(status as u32))
}

pub fn define_metric(kind: MetricKind, name: &str) -> HostResult<u32> {
    let mut id = 0u32;
    // SAFETY: pointer and length of a live &str; the host writes one u32.
    status(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, by: i64) -> HostResult<()> {
    // SAFETY: plain values.
    status(unsafe { proxy_increment_metric(id, by) })
}

pub fn record_metric(id: u32, value: u64) -> HostResult<()> {
    // SAFETY: plain values.
    status(unsafe { proxy_record_metric(id, value) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn property_path_has_no_trailing_nul() {
        assert_eq!(&*property_path(&["latchkey.route"]), b"latchkey.route");
        assert_eq!(&*property_path(&["xds", "route_name"]), b"xds\0route_name");
    }
}
