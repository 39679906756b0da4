//! OAuth2 tokens, as data: what to send to a token server ([`request`]), what
//! its answer means ([`response`]), and the per-key cache state machine shared by
//! every worker ([`cache`]). No I/O and no clock here: the filter performs the
//! call and passes the time in.

pub mod cache;
pub mod request;
pub mod response;

pub use cache::{CacheState, Decision, Policy};
pub use request::{GrantInput, TokenRequest};
pub use response::{FetchError, Token};
