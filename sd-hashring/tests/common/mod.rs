//! Helpers shared by integration tests (and, by path, by the examples).

pub(crate) mod memberships;
