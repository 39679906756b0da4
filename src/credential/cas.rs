//! Read-modify-write of a value every worker shares, under compare-and-swap.
//!
//! Envoy's shared data has no lock: a writer reads a value with its CAS token
//! and writes back only if nobody wrote in between. When somebody did, the read,
//! the decision and the write are all done again on what is there now; a lost
//! update (a token fetched and never stored, a refused token never dropped)
//! would otherwise be silent. The filter's token cache writes go through
//! [`retry`]; the host calls stay in the closure.

/// What one read-decide-write attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt<T> {
    /// Written, or nothing to write: the result.
    Done(T),
    /// Another writer came first: read again and decide again.
    Conflict,
}

/// Runs `attempt` until it is [`Attempt::Done`], at most `tries` times.
/// `None` when every try met a conflict (the key is contended this round; the
/// caller falls back to what is safe: wait, or leave it for the next request).
pub fn retry<T>(tries: usize, mut attempt: impl FnMut() -> Attempt<T>) -> Option<T> {
    for _ in 0..tries {
        if let Attempt::Done(v) = attempt() {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A shared value with a CAS token, and a rival that writes in between a
    /// reader's read and its write the first `rival_writes` times.
    struct Shared {
        value: Cell<u32>,
        cas: Cell<u32>,
        rival_writes: Cell<u32>,
    }

    impl Shared {
        fn new(rival_writes: u32) -> Self {
            Shared {
                value: Cell::new(0),
                cas: Cell::new(1),
                rival_writes: Cell::new(rival_writes),
            }
        }

        fn read(&self) -> (u32, u32) {
            let seen = (self.value.get(), self.cas.get());
            if self.rival_writes.get() > 0 {
                self.rival_writes.set(self.rival_writes.get() - 1);
                self.value.set(self.value.get() + 100);
                self.cas.set(self.cas.get() + 1);
            }
            seen
        }

        fn write(&self, value: u32, cas: u32) -> bool {
            if cas != self.cas.get() {
                return false;
            }
            self.value.set(value);
            self.cas.set(cas + 1);
            true
        }

        /// Adds one: the update under test.
        fn increment(&self) -> Attempt<u32> {
            let (v, cas) = self.read();
            if self.write(v + 1, cas) {
                Attempt::Done(v + 1)
            } else {
                Attempt::Conflict
            }
        }
    }

    #[test]
    fn a_conflict_is_read_again_and_no_update_is_lost() {
        let shared = Shared::new(2);
        let mut attempts = 0;
        let got = retry(4, || {
            attempts += 1;
            shared.increment()
        });
        // Two rival writes (+100 each), then ours on top of them.
        assert_eq!(got, Some(201));
        assert_eq!(shared.value.get(), 201);
        assert_eq!(attempts, 3);
    }

    #[test]
    fn gives_up_after_the_tries_without_writing() {
        let shared = Shared::new(10);
        let mut attempts = 0;
        let got = retry(4, || {
            attempts += 1;
            shared.increment()
        });
        assert_eq!(got, None);
        assert_eq!(attempts, 4);
        // Only the rival's writes landed.
        assert_eq!(shared.value.get(), 400);
    }

    #[test]
    fn done_at_once_is_one_attempt_and_zero_tries_is_none() {
        let mut attempts = 0;
        assert_eq!(
            retry(4, || {
                attempts += 1;
                Attempt::Done("nothing to write")
            }),
            Some("nothing to write")
        );
        assert_eq!(attempts, 1);
        assert_eq!(retry(0, || Attempt::Done(1)), None);
    }
}
