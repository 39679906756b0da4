//! Everything latchkey fetches, as data: OAuth2 and managed-identity tokens,
//! values read from secret stores, Vault AppRole logins. Each kind builds its
//! call ([`store::HttpCall`]) and reads its answer; [`cache`] is the per-key state
//! machine every worker shares (one fetch per key for the whole proxy, refresh
//! ahead, backoff, last good value kept); [`keys`] says where each entry lives.
//! No I/O and no clock here: the filter performs the calls and passes time in.

pub mod assertion;
pub mod broker;
pub mod cache;
pub mod cas;
pub mod exchange;
pub mod keys;
pub mod slot;
pub mod store;
pub mod token_request;
pub mod token_response;
pub mod token_store;

pub use cache::{CacheState, Choice, Policy};
pub use token_request::{GrantInput, TokenRequest};
pub use token_response::{FetchError, Token};
