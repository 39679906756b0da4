//! latchkey: a credential broker inside Envoy.
//!
//! Per request the filter
//! 1. finds the route's auth configuration ([`router`]), the path read as
//!    every upstream reads it ([`path`]),
//! 2. reads the caller's claims that `jwt_authn` verified ([`claims`]),
//! 3. decides whether the caller may use the route and which connection serves
//!    each injection ([`policy`]),
//! 4. resolves each connection's credential ([`credential`]: API keys, tokens
//!    fetched and cached across workers, values read from secret stores), and
//! 5. changes the request ([`inject`]) or answers itself with a JSON
//!    401/403/503 ([`response`]).
//!
//! [`request`] is that flow as one pure function of what the glue read, ending
//! in one outcome; [`runtime`] is a loaded configuration with its caches'
//! slots. Everything above is plain Rust over values, tested natively; what it
//! needs of the host goes through the [`proxy::Proxy`] trait. Only [`filter`]
//! talks to the proxy-wasm host, and it decides nothing.

pub mod claims;
pub mod config;
pub mod consent;
pub mod credential;
pub mod discovery;
pub mod fnv;
pub mod inject;
pub mod pairs;
pub mod path;
pub mod pb;
pub mod policy;
pub mod proxy;
pub mod request;
pub mod response;
pub mod router;
pub mod runtime;
pub mod secret;
pub mod stats;
pub mod text;

pub mod filter;
