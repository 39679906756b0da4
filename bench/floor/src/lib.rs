//! The floors `make bench-quick` compares latchkey with (issue #20): proxy-wasm
//! filters built like latchkey (the same SDK, context dispatch and release
//! profile, the same binaryen pass) that make exactly the host calls one of
//! latchkey's request paths cannot avoid, and decide nothing. What latchkey
//! costs above its floor is its own work: parsing, routing, policy, cache.
//!
//! The plugin configuration names the path:
//! - `header`: read the request's header map once, set one header;
//! - `query`: read the header map once, replace `:path`;
//! - `oauth`: read jwt_authn's metadata once, read the header map, set
//!   `authorization`.
//!
//! Host calls go through the raw ABI, as latchkey's `src/filter/host.rs` does,
//! so the floor pays no SDK decoding latchkey doesn't pay either.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Header,
    Query,
    OAuth,
}

extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
}

const REQUEST_HEADERS: u32 = 0;
const PLUGIN_CONFIGURATION: u32 = 7;

/// Takes ownership of a buffer the host allocated in this VM's memory.
fn owned(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host allocated `size` bytes at `data` with proxy_on_memory_allocate.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

fn header_pairs() -> Vec<u8> {
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    unsafe { proxy_get_header_map_pairs(REQUEST_HEADERS, &mut data, &mut size) };
    owned(data, size)
}

fn replace_header(name: &str, value: &[u8]) {
    // SAFETY: pointers and lengths of live slices.
    unsafe {
        proxy_replace_header_map_value(
            REQUEST_HEADERS,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    };
}

fn metadata() -> Vec<u8> {
    let path = b"metadata";
    let (mut data, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: pointer and length of a live slice, out-pointers to locals.
    unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    owned(data, size)
}

fn plugin_configuration(size: usize) -> Vec<u8> {
    let (mut data, mut got) = (std::ptr::null_mut(), 0usize);
    // SAFETY: out-pointers to locals.
    unsafe { proxy_get_buffer_bytes(PLUGIN_CONFIGURATION, 0, size, &mut data, &mut got) };
    owned(data, got)
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root(Path::Header)) });
}}

struct Root(Path);

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        self.0 = match plugin_configuration(size).as_slice() {
            b"query" => Path::Query,
            b"oauth" => Path::OAuth,
            _ => Path::Header,
        };
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor(self.0)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Floor(Path);

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        match self.0 {
            Path::Header => {
                let pairs = header_pairs();
                replace_header("x-api-key", b"floor-key-value-0123456789");
                drop(pairs);
            }
            Path::Query => {
                let pairs = header_pairs();
                replace_header(":path", b"/?api_key=floor-key-value-0123456789");
                drop(pairs);
            }
            Path::OAuth => {
                let md = metadata();
                let pairs = header_pairs();
                replace_header(
                    "authorization",
                    b"Bearer floor.access.token-0123456789abcdef0123456789abcdef",
                );
                drop((md, pairs));
            }
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
}
