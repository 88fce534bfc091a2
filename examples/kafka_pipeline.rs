//! A Kafka pipeline on sd-pool: orders for many customers go to a topic; member
//! processes of one consumer group handle them per key (some jobs slow, some failing
//! into the dead-letter topic), each effect written once through sd-outbox's inbox in
//! the job's PostgreSQL transaction. One member is SIGKILLed mid-run and replaced.
//!
//! `cargo run -p sd-examples --example kafka_pipeline --features kafka-pipeline -- \
//!    --bootstrap 127.0.0.1:9092 --postgres postgres://postgres@127.0.0.1/test`
//!
//! The topics must exist (`--topic` with `--partitions`, and `{topic}.dlq`); tansu and
//! Kafka with `auto.create.topics.enable=false` create none on first use. The program
//! ends with a summary that checks itself, and exits non-zero when a customer's orders
//! first ran out of order, an order has no effect or two, a failing order did not reach
//! the dead-letter topic, or the run did not finish within `--timeout`. (A failing order
//! may reach it twice: dead letters are written at least once, and the kill makes some
//! run again.)

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sd_outbox::postgres::Inbox;
use sd_pool::kafka::{KafkaConsumer, Record, RecordOrder, RetryPolicy};
use sd_pool::{Order, Pool};
use sqlx::PgPool;
use uuid::Uuid;

/// Errors of the example.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The command line.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "kafka_pipeline")]
pub(crate) struct Args {
    /// The Kafka brokers (`host:port`).
    #[arg(long)]
    pub(crate) bootstrap: String,
    /// The PostgreSQL database for the inbox and the effects.
    #[arg(long, value_name = "URL")]
    pub(crate) postgres: String,
    /// The orders topic (its dead letters go to `{topic}.dlq`).
    #[arg(long, default_value = "orders")]
    pub(crate) topic: String,
    /// Customers (record keys).
    #[arg(long, default_value_t = 200)]
    pub(crate) customers: usize,
    /// Orders per customer.
    #[arg(long, default_value_t = 20)]
    pub(crate) orders: usize,
    /// Consumer processes running at once.
    #[arg(long, default_value_t = 3)]
    pub(crate) members: usize,
    /// Kill the first member after the group handled this many orders.
    #[arg(long, default_value_t = 1_000)]
    pub(crate) kill_after: usize,
    /// Every customer's order number `n` with `n % fail_every == fail_every - 1` always
    /// fails (0: none fails).
    #[arg(long, default_value_t = 7)]
    pub(crate) fail_every: usize,
    /// Orders with `n % slow_every == 0` take 50 ms (0: none is slow).
    #[arg(long, default_value_t = 5)]
    pub(crate) slow_every: usize,
    /// Give up (and fail) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "180", value_parser = seconds)]
    pub(crate) timeout: Duration,
    /// Run as member N (the program starts its members this way).
    #[arg(long, hide = true)]
    pub(crate) member: Option<usize>,
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse()
        .map(Duration::from_secs)
        .map_err(|e| format!("{s}: {e}"))
}

/// Parses the flags (the program name is added).
pub(crate) fn parse_args(flags: impl IntoIterator<Item = String>) -> Result<Args, clap::Error> {
    use clap::Parser;
    Args::try_parse_from(std::iter::once("kafka_pipeline".to_owned()).chain(flags))
}

impl Args {
    /// The flags that reproduce these arguments (for a member process).
    pub(crate) fn to_flags(&self) -> Vec<String> {
        let mut f = vec![
            format!("--bootstrap={}", self.bootstrap),
            format!("--postgres={}", self.postgres),
            format!("--topic={}", self.topic),
            format!("--customers={}", self.customers),
            format!("--orders={}", self.orders),
            format!("--fail-every={}", self.fail_every),
            format!("--slow-every={}", self.slow_every),
        ];
        if let Some(m) = self.member {
            f.push(format!("--member={m}"));
        }
        f
    }

    fn fails(&self, n: usize) -> bool {
        self.fail_every > 0 && n % self.fail_every == self.fail_every - 1
    }

    fn group(&self) -> String {
        format!("{}-pipeline", self.topic)
    }
}

const EFFECTS: &str = "kafka_pipeline_effects";

/// The order `(customer, n)` a record carries (`c{customer}:{n}`).
fn order_of(record: &Record) -> Result<(String, usize), String> {
    let text = std::str::from_utf8(record.payload().unwrap_or_default())
        .map_err(|_| "the payload is not UTF-8".to_owned())?;
    let (customer, n) = text
        .split_once(':')
        .ok_or_else(|| format!("not an order: {text:?}"))?;
    let n = n.parse().map_err(|_| format!("not an order: {text:?}"))?;
    Ok((customer.to_owned(), n))
}

/// One member: consumes until its stdin closes, printing `RUN customer n partition
/// offset fresh` after each order it handled.
pub(crate) async fn member(args: &Args) -> Result<(), BoxError> {
    let db = PgPool::connect(&args.postgres).await?;
    let inbox = Inbox::builder().build(db.clone())?;
    let pool = Pool::builder()
        .workers(32)
        .queue(128)
        .order(Order::PerKey)
        .build()?;
    let mut group_config = ClientConfig::new();
    group_config
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500");
    let consumer = KafkaConsumer::builder(&args.bootstrap)
        .group(args.group())
        .topic(&args.topic)
        .order(RecordOrder::PerKey)
        .dead_letter_topic(format!("{}.dlq", args.topic))
        .retry(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(20))
                .max_attempts(3)
                .build()?,
        )
        .client_config(group_config)
        .build(pool)?;
    let args = Arc::new(args.clone());
    let handler = move |record: Record| {
        let (db, inbox, args) = (db.clone(), inbox.clone(), Arc::clone(&args));
        async move {
            let (customer, n) = order_of(&record)?;
            if args.fails(n) {
                return Err(format!("order {customer}:{n} was declined"));
            }
            if args.slow_every > 0 && n % args.slow_every == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let err = |e: &dyn fmt::Display| e.to_string();
            let mut tx = db.begin().await.map_err(|e| err(&e))?;
            // The inbox key: the record's partition names the consumer, its offset the id.
            let consumer = format!("{}:{}:{}", args.group(), record.topic(), record.partition());
            let id = Uuid::from_u64_pair(0, record.offset() as u64);
            let fresh = inbox
                .receive(&mut tx, &consumer, id)
                .await
                .map_err(|e| err(&e))?;
            if fresh {
                sqlx::query(&format!(
                    "INSERT INTO {EFFECTS} (customer, n) VALUES ($1, $2)"
                ))
                .bind(&customer)
                .bind(n as i64)
                .execute(&mut *tx)
                .await
                .map_err(|e| err(&e))?;
            }
            tx.commit().await.map_err(|e| err(&e))?;
            println!(
                "RUN {customer} {n} {} {} {fresh}",
                record.partition(),
                record.offset()
            );
            Ok(())
        }
    };
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
        })
        .await;
    };
    consumer.run(handler, stdin_closed).await?;
    Ok(())
}

/// One handled order as a member printed it.
#[derive(Debug, Clone)]
struct Run {
    member: usize,
    customer: String,
    n: usize,
    fresh: bool,
}

/// A member process and the runs it printed.
struct Member {
    child: Child,
}

impl Member {
    fn start(
        mut command: Command,
        runs: Arc<Mutex<Vec<Run>>>,
        member: usize,
    ) -> Result<Member, BoxError> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Some(at) = line.find("RUN ") else {
                    continue;
                };
                let f: Vec<&str> = line[at + 4..].split_whitespace().collect();
                if let [customer, n, _, _, fresh] = f[..]
                    && let Ok(n) = n.parse()
                {
                    let run = Run {
                        member,
                        customer: customer.to_owned(),
                        n,
                        fresh: fresh == "true",
                    };
                    runs.lock().unwrap_or_else(|p| p.into_inner()).push(run);
                }
            }
        });
        Ok(Member { child })
    }

    /// Closes its stdin: it drains, commits and leaves the group.
    fn stop(mut self) -> Result<(), BoxError> {
        drop(self.child.stdin.take());
        self.child.wait()?;
        Ok(())
    }

    /// SIGKILL: no drain, no commit.
    fn kill(mut self) -> Result<(), BoxError> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

/// What the run did, and what it found wrong.
#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) orders: usize,
    pub(crate) failing: usize,
    pub(crate) runs: usize,
    pub(crate) redeliveries: usize,
    pub(crate) effects: usize,
    /// Failing orders found in the dead-letter topic (each counted once).
    pub(crate) dead_letters: usize,
    /// Dead-letter records in all (at least once: an order dead-lettered and then
    /// redelivered after a kill is dead-lettered again).
    pub(crate) dead_letter_records: usize,
    pub(crate) out_of_order: Vec<String>,
    pub(crate) missing: usize,
    pub(crate) doubled: usize,
}

impl Summary {
    /// Broken promises, in words; empty when the run kept every one.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.out_of_order.is_empty() {
            p.push(format!(
                "orders first ran out of order for {:?}",
                self.out_of_order
            ));
        }
        if self.missing > 0 {
            p.push(format!("{} orders have no effect", self.missing));
        }
        if self.doubled > 0 {
            p.push(format!("{} orders have more than one effect", self.doubled));
        }
        if self.dead_letters != self.failing {
            p.push(format!(
                "{} failing orders, {} dead letters",
                self.failing, self.dead_letters
            ));
        }
        p
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} orders ({} failing), {} handler runs, {} redeliveries recognised by the inbox",
            self.orders, self.failing, self.runs, self.redeliveries
        )?;
        write!(
            f,
            "{} effects, {} dead-lettered orders ({} dead-letter records), {} problems",
            self.effects,
            self.dead_letters,
            self.dead_letter_records,
            self.problems().len()
        )
    }
}

/// Produces every order, starts `members` member processes (`spawn(i)` makes member
/// `i`'s command), kills the first after `kill_after` orders and starts a replacement,
/// waits until every order has its effect or its dead letter, stops the members and
/// checks the history.
pub(crate) async fn run(
    args: &Args,
    spawn: impl Fn(usize) -> Command,
) -> Result<Summary, BoxError> {
    let db = PgPool::connect(&args.postgres).await?;
    let inbox = Inbox::builder().build(db.clone())?;
    inbox.migrate().await?;
    sqlx::raw_sql(&format!(
        "DROP TABLE IF EXISTS {EFFECTS}; CREATE TABLE {EFFECTS} (customer text NOT NULL, n bigint NOT NULL)"
    ))
    .execute(&db)
    .await?;
    produce(args).await?;
    let deadline = Instant::now() + args.timeout;
    let runs = Arc::new(Mutex::new(Vec::<Run>::new()));
    let mut members = Vec::new();
    for i in 0..args.members {
        members.push(Member::start(spawn(i), Arc::clone(&runs), i)?);
    }
    let count = |runs: &Arc<Mutex<Vec<Run>>>| runs.lock().unwrap_or_else(|p| p.into_inner()).len();
    while count(&runs) < args.kill_after {
        if Instant::now() > deadline {
            return Err("the members handled too few orders before the kill".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kill the member that has handled the most orders: it holds partitions.
    let busiest = {
        let runs = runs.lock().unwrap_or_else(|p| p.into_inner());
        let mut per = vec![0usize; members.len()];
        for r in runs.iter() {
            if let Some(n) = per.get_mut(r.member) {
                *n += 1;
            }
        }
        (0..per.len()).max_by_key(|i| per[*i]).unwrap_or(0)
    };
    members.remove(busiest).kill()?;
    members.push(Member::start(
        spawn(args.members),
        Arc::clone(&runs),
        args.members,
    )?);

    let orders = args.customers * args.orders;
    let failing = (0..args.orders).filter(|n| args.fails(*n)).count() * args.customers;
    let dead_letters = dead_letter_counter(args)?;
    loop {
        let effects: i64 = sqlx::query_scalar(&format!(
            "SELECT count(DISTINCT (customer, n)) FROM {EFFECTS}"
        ))
        .fetch_one(&db)
        .await?;
        let letters = distinct_orders(&dead_letters);
        if effects as usize >= orders - failing && letters >= failing {
            break;
        }
        if Instant::now() > deadline {
            return Err(
                format!("{effects} effects and {letters} dead letters before the timeout").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for m in members {
        m.stop()?;
    }
    let runs = runs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let effects: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT customer, n, count(*) FROM {EFFECTS} GROUP BY customer, n"
    ))
    .fetch_all(&db)
    .await?;
    let mut summary = judge(
        args,
        &runs,
        &effects,
        distinct_orders(&dead_letters),
        orders,
        failing,
    );
    summary.dead_letter_records = dead_letters.lock().unwrap_or_else(|p| p.into_inner()).len();
    Ok(summary)
}

fn judge(
    args: &Args,
    runs: &[Run],
    effects: &[(String, i64, i64)],
    dead_letters: usize,
    orders: usize,
    failing: usize,
) -> Summary {
    let mut by_customer: HashMap<&str, Vec<usize>> = HashMap::new();
    for r in runs {
        by_customer.entry(&r.customer).or_default().push(r.n);
    }
    let mut out_of_order = Vec::new();
    for (customer, ns) in &by_customer {
        // Each order's first run, in the order runs were printed by... one member at a
        // time holds a customer, so the first runs of its orders must increase.
        let mut first = BTreeMap::new();
        for (i, n) in ns.iter().enumerate() {
            first.entry(*n).or_insert(i);
        }
        let positions: Vec<usize> = first.values().copied().collect();
        if positions.windows(2).any(|w| w[0] > w[1]) {
            out_of_order.push((*customer).to_owned());
        }
    }
    let have: HashMap<(&str, i64), i64> = effects
        .iter()
        .map(|(c, n, k)| ((c.as_str(), *n), *k))
        .collect();
    let mut missing = 0;
    for c in 0..args.customers {
        for n in 0..args.orders {
            if !args.fails(n) && !have.contains_key(&(format!("c{c}").as_str(), n as i64)) {
                missing += 1;
            }
        }
    }
    Summary {
        orders,
        failing,
        runs: runs.len(),
        redeliveries: runs.iter().filter(|r| !r.fresh).count(),
        effects: effects.len(),
        dead_letters,
        dead_letter_records: dead_letters,
        out_of_order,
        missing,
        doubled: effects.iter().filter(|(_, _, k)| *k > 1).count(),
    }
}

/// Writes every order, customer `c{i}` keyed by its name, order numbers in sequence.
async fn produce(args: &Args) -> Result<(), BoxError> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    for n in 0..args.orders {
        let sends = (0..args.customers).map(|c| {
            let (key, value) = (format!("c{c}"), format!("c{c}:{n}"));
            let producer = producer.clone();
            let topic = args.topic.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&value),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(drop)
                    .map_err(|(e, _)| e)
            }
        });
        for sent in futures::future::join_all(sends).await {
            sent?;
        }
    }
    Ok(())
}

/// The distinct orders among the dead letters.
fn distinct_orders(letters: &Mutex<Vec<Record>>) -> usize {
    let letters = letters.lock().unwrap_or_else(|p| p.into_inner());
    let orders: std::collections::HashSet<(String, usize)> =
        letters.iter().filter_map(|r| order_of(r).ok()).collect();
    orders.len()
}

/// Reads the dead-letter topic in the background (a member of its own group) and
/// collects what arrives.
fn dead_letter_counter(args: &Args) -> Result<Arc<Mutex<Vec<Record>>>, BoxError> {
    let letters = Arc::new(Mutex::new(Vec::new()));
    let reader = KafkaConsumer::builder(&args.bootstrap)
        .group(format!("{}-dlq-reader", args.group()))
        .topic(format!("{}.dlq", args.topic))
        .order(RecordOrder::Unordered)
        .build(Pool::builder().workers(1).queue(16).build()?)?;
    let l = Arc::clone(&letters);
    tokio::spawn(async move {
        let collect = move |r: Record| {
            l.lock().unwrap_or_else(|p| p.into_inner()).push(r);
            async { Ok::<(), String>(()) }
        };
        if let Err(e) = reader.run(collect, std::future::pending::<()>()).await {
            eprintln!("dead-letter reader: {e}");
        }
    });
    Ok(letters)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
#[allow(dead_code)]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    if args.member.is_some() {
        return match member(&args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("member: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let spawn = |i: usize| {
        let mut a = args.clone();
        a.member = Some(i);
        let mut c = Command::new(&exe);
        c.args(a.to_flags());
        c
    };
    match run(&args, spawn).await {
        Ok(summary) => {
            println!("{summary}");
            let problems = summary.problems();
            for p in &problems {
                eprintln!("problem: {p}");
            }
            if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("kafka_pipeline: {e}");
            ExitCode::FAILURE
        }
    }
}
