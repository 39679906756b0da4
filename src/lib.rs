//! latchkey: a credential broker inside Envoy.
//!
//! Per request the filter
//! 1. finds the route's auth configuration ([`router`]),
//! 2. reads the caller's claims that `jwt_authn` verified ([`claims`]),
//! 3. decides whether the caller may use the route and which connection serves
//!    each injection ([`policy`]),
//! 4. changes the request: API key in a header or the query, headers stripped
//!    ([`inject`]), or answers itself with a JSON 401/403/503 ([`response`]).
//!
//! Everything above is plain Rust over values, tested natively. Only
//! [`filter`] talks to the proxy-wasm host.

pub mod claims;
pub mod config;
pub mod credential;
pub mod discovery;
pub mod inject;
pub mod loaded;
pub mod pairs;
pub mod path;
pub mod pb;
pub mod policy;
pub mod proxy;
pub mod request;
pub mod response;
pub mod router;
pub mod secret;
pub mod stats;

pub mod filter;
