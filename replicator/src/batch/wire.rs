//! serde helpers for decoding hostile input: sequences whose element count
//! is bounded while they are decoded (not after), and a way to keep the
//! reason a value was refused.
//!
//! postcard turns a custom deserialization error into a bare
//! `SerdeDeCustom`, losing its message. So that the reader can still say
//! *what* was wrong ("path component \"..\""), the place that refuses a
//! value also records the reason in a thread-local slot, which the reader
//! clears before decoding a frame and takes after a failure.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

thread_local! {
    static REASON: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A deserialization error whose reason the batch reader can report.
pub(crate) fn reject<E: de::Error>(reason: impl fmt::Display) -> E {
    let msg = reason.to_string();
    REASON.with(|r| *r.borrow_mut() = Some(msg.clone()));
    E::custom(msg)
}

pub(crate) fn clear_reason() {
    REASON.with(|r| r.borrow_mut().take());
}

pub(crate) fn take_reason() -> Option<String> {
    REASON.with(|r| r.borrow_mut().take())
}

/// Deserializes a sequence of at most `MAX` elements, failing as soon as
/// the declared or the actual count goes beyond it: a few bytes of input
/// that claim millions of small elements cannot make the decoder allocate
/// for them.
pub(crate) fn bounded_vec<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct BoundedVisitor<T, const MAX: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for BoundedVisitor<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a sequence of at most {MAX} elements")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if let Some(n) = seq.size_hint()
                && n > MAX
            {
                return Err(reject(format!(
                    "{n} elements where at most {MAX} are allowed"
                )));
            }
            let mut out = Vec::new();
            while let Some(x) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(reject(format!("more than {MAX} elements")));
                }
                out.push(x);
            }
            Ok(out)
        }
    }

    d.deserialize_seq(BoundedVisitor::<T, MAX>(PhantomData))
}
