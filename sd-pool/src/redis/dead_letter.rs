//! The dead-letter stream: entries that failed `max_deliveries` times, moved there with
//! their error in one script (`XACK` of the original and `XADD` of the dead letter), and
//! moved back by a redrive.

use redis::aio::ConnectionLike;
use sd_core::redis::Script;

use super::{Entry, Settings, redis_err};
use crate::error::Result;

/// The field of a dead letter naming the stream its entry was read from.
pub const DLQ_STREAM: &str = "sd-dlq-stream";
/// The field of a dead letter naming the consumer group that gave up on it.
pub const DLQ_GROUP: &str = "sd-dlq-group";
/// The field of a dead letter holding its entry's id in the original stream.
pub const DLQ_ID: &str = "sd-dlq-id";
/// The field of a dead letter holding the last delivery's error: the handler error's
/// `Display`, or a note that the last delivery left no result.
pub const DLQ_ERROR: &str = "sd-dlq-error";
/// The field of a dead letter counting its entry's deliveries (decimal).
pub const DLQ_DELIVERIES: &str = "sd-dlq-deliveries";

/// Moves one entry: `XACK` it in the stream and, only if it was still pending there,
/// `XADD` it to the dead-letter stream with its fields and the `sd-dlq-*` fields.
/// KEYS: stream, dead-letter stream. ARGV: group, id, error, deliveries, then the entry's
/// field-value pairs. Returns 1 when moved, 0 when the entry was no longer pending.
static MOVE: Script = Script::new(
    r"
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
local args = { KEYS[2], '*' }
for i = 5, #ARGV do
  args[#args + 1] = ARGV[i]
end
for _, kv in ipairs({
  { 'sd-dlq-stream', KEYS[1] }, { 'sd-dlq-group', ARGV[1] }, { 'sd-dlq-id', ARGV[2] },
  { 'sd-dlq-error', ARGV[3] }, { 'sd-dlq-deliveries', ARGV[4] },
}) do
  args[#args + 1] = kv[1]
  args[#args + 1] = kv[2]
end
redis.call('XADD', unpack(args))
return 1
",
);

/// Moves dead letters of the stream back to it: from ARGV[2] (`-` or `(id`), up to
/// ARGV[1] dead letters are read; each whose `sd-dlq-stream` is KEYS[2] is added to it
/// again (a new entry with its own fields, the `sd-dlq-*` ones dropped) and deleted from
/// the dead-letter stream KEYS[1]. Returns the number moved, the number read and the last
/// id read.
static REDRIVE: Script = Script::new(
    r"
local moved, last = 0, ''
local read = redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', ARGV[1])
for _, e in ipairs(read) do
  last = e[1]
  local fields, origin = {}, nil
  local kv = e[2]
  for i = 1, #kv, 2 do
    if kv[i] == 'sd-dlq-stream' then
      origin = kv[i + 1]
    elseif string.sub(kv[i], 1, 7) ~= 'sd-dlq-' then
      fields[#fields + 1] = kv[i]
      fields[#fields + 1] = kv[i + 1]
    end
  end
  if origin == KEYS[2] and #fields > 0 then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
    redis.call('XDEL', KEYS[1], e[1])
    moved = moved + 1
  end
end
return { moved, #read, last }
",
);

/// An entry on its way to the dead-letter stream, with the error that sends it there.
#[derive(Debug)]
pub(super) struct DeadLetter {
    pub(super) entry: Entry,
    pub(super) error: String,
}

/// What [`DeadLetter::move_to`] found.
pub(super) enum Moved {
    /// Acknowledged in the stream and added to the dead-letter stream.
    Moved,
    /// No longer pending (acknowledged by another consumer): nothing written.
    NotPending,
}

impl DeadLetter {
    /// Acknowledges the entry and adds it to the dead-letter stream, in one script.
    pub(super) async fn move_to<C: ConnectionLike>(
        &self,
        conn: &mut C,
        cfg: &Settings,
    ) -> Result<Moved> {
        let mut call = MOVE.call(2);
        call.arg(&cfg.stream)
            .arg(cfg.dead_letter_stream())
            .arg(&cfg.group)
            .arg(&self.entry.id)
            .arg(&self.error)
            .arg(self.entry.deliveries);
        for (field, value) in &self.entry.fields {
            call.arg(field).arg(value);
        }
        let moved: i64 = call
            .invoke(conn)
            .await
            .map_err(redis_err("dead-letter move"))?;
        Ok(if moved == 1 {
            Moved::Moved
        } else {
            Moved::NotPending
        })
    }
}

/// Moves up to `max` dead letters of `cfg`'s stream back to it, oldest first, each in
/// one script step (`XADD` to the stream, `XDEL` from the dead-letter stream); dead
/// letters of other streams are left. Returns how many moved.
pub(super) async fn redrive<C: ConnectionLike>(
    conn: &mut C,
    cfg: &Settings,
    max: usize,
) -> Result<u64> {
    const PAGE: usize = 100;
    let (mut moved, mut cursor) = (0u64, "-".to_owned());
    while moved < max as u64 {
        let page = PAGE.min(max - moved as usize);
        let mut call = REDRIVE.call(2);
        call.arg(cfg.dead_letter_stream())
            .arg(&cfg.stream)
            .arg(page)
            .arg(&cursor);
        let (n, read, last): (u64, usize, String) = call
            .invoke(conn)
            .await
            .map_err(redis_err("dead-letter redrive"))?;
        moved += n;
        if read < page {
            break;
        }
        cursor = format!("({last}");
    }
    Ok(moved)
}

/// The part of a key Redis Cluster hashes: the first non-empty `{tag}`, else the key.
pub(super) fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

/// The default dead-letter stream of `stream`: `{stream}:dead`, or `stream:dead` when the
/// name has a hash tag already, so both hash to the same cluster slot.
pub(super) fn default_name(stream: &str) -> String {
    if hash_tag(stream) == stream {
        format!("{{{stream}}}:dead")
    } else {
        format!("{stream}:dead")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_streams_share_the_streams_slot() {
        assert_eq!(hash_tag("orders"), "orders");
        assert_eq!(hash_tag("{orders}:in"), "orders");
        assert_eq!(hash_tag("a{}b{c}"), "a{}b{c}");
        assert_eq!(hash_tag("x{y"), "x{y");
        assert_eq!(default_name("orders"), "{orders}:dead");
        assert_eq!(default_name("{orders}:in"), "{orders}:in:dead");
        for stream in ["orders", "{orders}:in", "x{y}z"] {
            assert_eq!(
                hash_tag(&default_name(stream)),
                hash_tag(stream),
                "{stream}"
            );
        }
    }
}
