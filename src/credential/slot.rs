//! Where each fetched credential of a configuration lives in shared data: a
//! connection's token cache (for token exchange, bounded sets of per-caller
//! entries), a stored secret's value and its Vault login, each with its timing.

use std::rc::Rc;

use super::cache::Policy;
use super::exchange::Subject;
use crate::secret::Secret;

/// A connection's token cache, prepared at configure time.
#[derive(Debug)]
pub struct TokenSlot {
    /// The shared-data key; per caller, the prefix of its set keys.
    pub key: String,
    /// One entry per caller, in bounded sets: token exchange (by subject token)
    /// and per-user consent (by caller key).
    pub per_caller: bool,
    /// Where a rotated refresh token is kept (refresh_token grant only).
    pub rt_key: Option<String>,
    pub policy: Policy,
    pub default_lifetime_ms: u64,
    /// An upstream 401 refreshes a token only once it is this old.
    pub drop_on_401_after_ms: u64,
    /// The connection's own entry (not per caller), made once.
    pub own_addr: Option<Rc<Addr>>,
}

impl TokenSlot {
    /// The shared-data key of set `i` of a token-exchange connection.
    pub fn set_key(&self, i: usize) -> String {
        format!("{}.x{i}", self.key)
    }

    /// Where the entry for this connection (and caller) lives; `None` for token
    /// exchange without a subject token.
    /// [`TokenSlot::addr`], shared: the one for the whole connection is made once.
    pub fn shared_addr(&self, connection: usize, subject: Option<&Secret>) -> Option<Rc<Addr>> {
        match &self.own_addr {
            // Made from this slot's connection; a per-caller slot has none.
            Some(a) => Some(a.clone()),
            None => self.addr(connection, subject).map(Rc::new),
        }
    }

    pub fn addr(&self, connection: usize, subject: Option<&Secret>) -> Option<Addr> {
        let owner = Owner::Connection(connection);
        if !self.per_caller {
            return Some(Addr {
                owner,
                key: self.key.clone(),
                subject: None,
            });
        }
        let s = Subject::of(subject?.expose());
        Some(Addr {
            owner,
            key: self.set_key(s.set),
            subject: Some(s),
        })
    }
}

/// A stored secret's cache, prepared at configure time.
#[derive(Debug)]
pub struct StoreSlot {
    /// `latchkey.v1.sec.<name>.<fingerprint>`.
    pub key: String,
    /// The AppRole login token's key (Vault with `approle` only).
    pub login_key: Option<String>,
    pub policy: Policy,
}

/// What a cache entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A token of connection `i` (OAuth2 or managed identity).
    Connection(usize),
    /// The value of store `i`.
    Store(usize),
    /// The Vault AppRole login token of store `i`.
    Login(usize),
    /// The Vault AppRole login token of provider `i`'s Transit signing key.
    SignerLogin(usize),
}

/// The cache of a Transit signing key's AppRole login token.
#[derive(Debug)]
pub struct LoginSlot {
    pub key: String,
    pub policy: Policy,
}

/// Where one cache entry lives: a connection's key, or a caller's entry in a set.
#[derive(Debug, Clone)]
pub struct Addr {
    pub owner: Owner,
    pub key: String,
    pub subject: Option<Subject>,
}
