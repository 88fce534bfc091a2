//! Parsing the stream commands' replies: entries, and the pending entries' delivery
//! counts.

use redis::Value;

use super::Entry;
use crate::error::{Error, Result, UnexpectedReply};

pub(super) fn reply_err(op: &'static str, what: &'static str) -> Error {
    Error::Backend {
        backend: "redis",
        operation: op,
        source: Box::new(UnexpectedReply { what }),
    }
}

pub(super) fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn as_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

/// `XREADGROUP` reply: nil, or `[[stream, [entry...]]]` (RESP2) / `{stream: [entry...]}` (RESP3).
pub(super) fn parse_read(reply: Value) -> Result<Vec<Entry>> {
    const OP: &str = "XREADGROUP";
    let streams: Vec<Value> = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut pair) if pair.len() == 2 => pair.pop(),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => return Err(reply_err(OP, "not an array or map")),
    };
    let mut out = Vec::new();
    for entries in streams {
        out.extend(parse_entries(entries)?);
    }
    Ok(out)
}

/// `[[id, [field, value, ...]], ...]`; entries deleted from the stream (nil) are skipped.
pub(super) fn parse_entries(v: Value) -> Result<Vec<Entry>> {
    const OP: &str = "stream entries";
    let items = match v {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        _ => return Err(reply_err(OP, "not an array")),
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else { continue };
        let mut parts = parts.into_iter();
        let id = parts
            .next()
            .and_then(|v| as_string(&v))
            .ok_or_else(|| reply_err(OP, "entry without an id"))?;
        let fields = match parts.next() {
            Some(Value::Array(kv)) => {
                let mut fields = Vec::with_capacity(kv.len() / 2);
                let mut kv = kv.into_iter();
                while let (Some(k), Some(v)) = (kv.next(), kv.next()) {
                    let k = as_string(&k).ok_or_else(|| reply_err(OP, "field name"))?;
                    fields.push((k, as_bytes(v).unwrap_or_default()));
                }
                fields
            }
            Some(Value::Map(kv)) => kv
                .into_iter()
                .filter_map(|(k, v)| Some((as_string(&k)?, as_bytes(v).unwrap_or_default())))
                .collect(),
            // Deleted entry (Redis 6.2 XAUTOCLAIM) or no fields: nothing to run.
            _ => continue,
        };
        out.push(Entry {
            id,
            fields,
            reclaimed: false,
            deliveries: 1,
        });
    }
    Ok(out)
}

/// Extended `XPENDING` reply: `[[id, consumer, idle ms, delivery count], ...]`, as
/// `(id, delivery count)`.
pub(super) fn parse_pending(v: Value) -> Result<Vec<(String, u64)>> {
    const OP: &str = "XPENDING";
    let Value::Array(items) = v else {
        return Err(reply_err(OP, "not an array"));
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(parts) = item else {
                return Err(reply_err(OP, "a pending entry is not an array"));
            };
            let id = parts.first().and_then(as_string);
            let count = match parts.get(3) {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => None,
            };
            id.zip(count)
                .ok_or_else(|| reply_err(OP, "a pending entry without an id or a delivery count"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_replies_and_rejects_nonsense() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("k"), bulk("v")])]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read(reply).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(entries[0].get_str("k"), Some("v"));
        assert!(parse_read(Value::Nil).unwrap().is_empty());
        assert!(parse_read(Value::Int(3)).is_err());
        assert!(parse_entries(Value::Int(3)).is_err());
        assert!(parse_entries(Value::Array(vec![Value::Array(vec![Value::Int(1)])])).is_err());
    }

    #[test]
    fn pending_entries_carry_their_delivery_counts() {
        let one = |id: &str, n: i64| {
            Value::Array(vec![bulk(id), bulk("c1"), Value::Int(40), Value::Int(n)])
        };
        let reply = Value::Array(vec![one("1-0", 1), one("2-0", 7)]);
        let pending = parse_pending(reply).unwrap();
        assert_eq!(pending, [("1-0".to_owned(), 1), ("2-0".to_owned(), 7)]);
        assert!(parse_pending(Value::Nil).is_err());
        assert!(parse_pending(Value::Array(vec![Value::Array(vec![bulk("1-0")])])).is_err());
        assert!(parse_pending(Value::Array(vec![one("1-0", -1)])).is_err());
    }
}
