//! Shared inputs for the benches, so that sd and each peer crate see identical data.
#![forbid(unsafe_code)]

/// `n` distinct keys of the form `user:{i}:session`, deterministic across runs.
pub fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user:{i}:session")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_distinct_and_stable() {
        let keys = super::keys(1000);
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), 1000);
        assert_eq!(keys[42], "user:42:session");
    }
}
