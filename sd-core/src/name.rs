//! The one rule for the names sd writes into your databases.
//!
//! **Table names** ([`TableName`]): `table` or `schema.table`, each part 1 to 48 bytes of
//! `[a-z0-9_]`, not starting with a digit. Lowercase only, because PostgreSQL folds
//! unquoted identifiers to lowercase and sd never quotes them; 48 bytes, because the
//! crates derive index, trigger and channel names by appending a suffix of at most 15
//! bytes and PostgreSQL cuts identifiers at 63.
//!
//! **Redis key prefixes** ([`KeyPrefix`]): 1 to 64 bytes of printable ASCII without
//! spaces, `{`, `}` or a trailing `:`. Keys are `{prefix}:{rest}`: the colon is sd's,
//! so `prefix("rl")` gives `rl:…` in every crate. Braces are refused because sd puts
//! the part of a key that picks the Redis Cluster slot in a `{hash tag}`, and a brace in
//! the prefix would move it.
//!
//! **Kafka topic names** ([`is_kafka_topic`]): Kafka's own rule, 1 to 249 bytes of
//! `[a-zA-Z0-9._-]`, not `.` or `..`.

use std::fmt;

use crate::error::ConfigError;

/// Whether `topic` is a name Kafka accepts for a topic: 1 to 249 bytes of
/// `[a-zA-Z0-9._-]`, and not `.` or `..`.
///
/// ```
/// use sd_core::name::is_kafka_topic;
///
/// assert!(is_kafka_topic("outbox.event.order"));
/// assert!(!is_kafka_topic("orders/eu") && !is_kafka_topic(".."));
/// ```
pub fn is_kafka_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The longest part of a table name, in bytes.
pub const MAX_TABLE_PART: usize = 48;

/// The longest key prefix, in bytes.
pub const MAX_KEY_PREFIX: usize = 64;

/// A checked PostgreSQL table name, `table` or `schema.table` (the rule is in the
/// [module docs](self)).
///
/// ```
/// use sd_core::TableName;
///
/// let t = TableName::parse("table", "billing.outbox")?;
/// assert_eq!((t.schema(), t.name()), (Some("billing"), "outbox"));
/// assert_eq!(t.to_string(), "billing.outbox");
/// assert_eq!(t.derived("_created_idx"), "outbox_created_idx");
/// assert_eq!(TableName::parse("table", "Outbox").unwrap_err().field, "table");
/// # Ok::<(), sd_core::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Checks `value` against the rule; the error names `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, ConfigError> {
        let (schema, name) = match value.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, value),
        };
        for part in schema.into_iter().chain([name]) {
            check_part(field, value, part)?;
        }
        Ok(TableName {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The schema, if one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table's own name, without its schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A name derived from the table's own name (an index, a trigger, a channel):
    /// `name` followed by `suffix`. Suffixes of up to 15 bytes stay within PostgreSQL's
    /// 63.
    pub fn derived(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.name)
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

fn check_part(field: &'static str, whole: &str, part: &str) -> Result<(), ConfigError> {
    let valid = !part.is_empty()
        && part.len() <= MAX_TABLE_PART
        && part.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "`{whole}` must be `table` or `schema.table`, each 1 to {MAX_TABLE_PART} \
                 of [a-z0-9_], not starting with a digit"
            ),
        ))
    }
}

/// A checked Redis key prefix (the rule is in the [module docs](self)); keys are
/// `{prefix}:{rest}`.
///
/// ```
/// use sd_core::KeyPrefix;
///
/// let prefix = KeyPrefix::parse("prefix", "rl")?;
/// assert_eq!(prefix.key("user:7"), "rl:user:7");
/// assert_eq!(prefix.tagged("user:7"), "rl:{user:7}");
/// assert!(KeyPrefix::parse("prefix", "").is_err());
/// assert!(KeyPrefix::parse("prefix", "rl:").is_err());
/// # Ok::<(), sd_core::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix(String);

impl KeyPrefix {
    /// Checks `value` against the rule; the error names `field`.
    pub fn parse(field: &'static str, value: &str) -> Result<Self, ConfigError> {
        let reason = if value.is_empty() || value.len() > MAX_KEY_PREFIX {
            Some("must be 1 to 64 bytes")
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            Some("must be printable ASCII without spaces")
        } else if value.contains(['{', '}']) {
            Some("must not contain `{` or `}`: the hash tag that picks the cluster slot is sd's")
        } else if value.ends_with(':') {
            Some("must not end with `:`; sd puts one colon between the prefix and the key")
        } else {
            None
        };
        match reason {
            None => Ok(KeyPrefix(value.to_owned())),
            Some(reason) => Err(ConfigError::new(field, format!("`{value}` {reason}"))),
        }
    }

    /// The prefix as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{prefix}:{rest}`.
    pub fn key(&self, rest: &str) -> String {
        let mut key = String::with_capacity(self.0.len() + 1 + rest.len());
        key.push_str(&self.0);
        key.push(':');
        key.push_str(rest);
        key
    }

    /// `{prefix}:{{tag}}`: `tag` is the hash tag, so every key with the same tag lands on
    /// one Redis Cluster slot.
    pub fn tagged(&self, tag: &str) -> String {
        let mut key = String::with_capacity(self.0.len() + 3 + tag.len());
        key.push_str(&self.0);
        key.push_str(":{");
        key.push_str(tag);
        key.push('}');
        key
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for KeyPrefix {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        for good in ["outbox.event.order", "a", "A-b_c.9", &"t".repeat(249)] {
            assert!(is_kafka_topic(good), "{good}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "a:b", "é", &"t".repeat(250)] {
            assert!(!is_kafka_topic(bad), "{bad}");
        }
    }
    use proptest::prelude::*;

    #[test]
    fn table_names_follow_one_rule() {
        for ok in [
            "t",
            "_t",
            "sd_outbox",
            "a1",
            "billing.outbox",
            &"x".repeat(48),
        ] {
            assert!(TableName::parse("table", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1t",
            "Outbox",
            "out-box",
            "a.b.c",
            ".t",
            "s.",
            "t;drop",
            &"x".repeat(49),
            "s.1t",
            "naïve",
        ] {
            let err = TableName::parse("events_table", bad).unwrap_err();
            assert_eq!(err.field, "events_table", "{bad}");
        }
    }

    #[test]
    fn prefixes_follow_one_rule() {
        for ok in ["rl", "app:rl", "a-b.c", &"p".repeat(64)] {
            assert!(KeyPrefix::parse("prefix", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "rl:",
            "a b",
            "{rl}",
            "r}l",
            "tab\t",
            "é",
            &"p".repeat(65),
        ] {
            assert_eq!(KeyPrefix::parse("prefix", bad).unwrap_err().field, "prefix");
        }
    }

    proptest! {
        #[test]
        fn an_accepted_table_name_prints_back_as_given(s in "[a-z_][a-z0-9_]{0,10}(\\.[a-z_][a-z0-9_]{0,10})?") {
            let t = TableName::parse("table", &s).unwrap();
            prop_assert_eq!(t.to_string(), s);
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,80}") {
            let _ = TableName::parse("table", &s);
            let _ = KeyPrefix::parse("prefix", &s);
        }

        #[test]
        fn keys_start_with_the_prefix_and_one_colon(p in "[a-z]{1,8}", rest in "[ -~]{0,20}") {
            let prefix = KeyPrefix::parse("prefix", &p).unwrap();
            let key = prefix.key(&rest);
            let head = format!("{p}:");
            prop_assert!(key.starts_with(&head));
            prop_assert_eq!(&key[p.len() + 1..], rest.as_str());
        }
    }
}
