//! keygate's data plane. So far: the in-memory token index every request is checked against
//! ([`index`]), and the follower that keeps it current from the store's change feed ([`follow`]).
#![forbid(unsafe_code)]

pub mod follow;
pub mod index;
