//! `Script` against a real Redis: EVALSHA on a server that knows the script, EVAL once
//! after NOSCRIPT (a flushed or restarted server), errors from the script surfaced.
#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used)]

use sd_core::redis::{Script, is_noscript};

static INCR: Script = Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");

fn calls(info: &str, command: &str) -> u64 {
    let field = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&field))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// The (EVALSHA, EVAL) call counts the server has recorded since `CONFIG RESETSTAT`.
async fn script_calls(conn: &mut redis::aio::MultiplexedConnection) -> (u64, u64, String) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap();
    (calls(&info, "evalsha"), calls(&info, "eval"), info)
}

#[tokio::test]
async fn evalsha_then_eval_once_after_noscript() {
    let server = sd_testkit::redis().expect("redis-server");
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();

    // A server that never saw the script: NOSCRIPT, then EVAL.
    let mut call = INCR.call(1);
    call.arg("n").arg(5);
    assert_eq!(call.invoke::<i64>(&mut conn).await.unwrap(), 5);
    // It is cached now: the next call is one EVALSHA.
    assert_eq!(call.invoke::<i64>(&mut conn).await.unwrap(), 10);
    let (evalsha, eval, info) = script_calls(&mut conn).await;
    assert_eq!((evalsha, eval), (2, 1), "{info}");

    // A flushed server (what a restart without persistence looks like): once more.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(call.invoke::<i64>(&mut conn).await.unwrap(), 15);
    let (evalsha, eval, info) = script_calls(&mut conn).await;
    assert_eq!((evalsha, eval), (3, 2), "{info}");
}

#[tokio::test]
async fn a_failing_script_is_an_error_not_a_retry() {
    let server = sd_testkit::redis().expect("redis-server");
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    static BAD: Script = Script::new("return redis.error_reply('ERR refused by script')");
    let err = BAD.call(0).invoke::<i64>(&mut conn).await.unwrap_err();
    assert!(!is_noscript(&err));
    assert!(err.to_string().contains("refused by script"), "{err}");
}
