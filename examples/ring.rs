//! Where does each key live? Reads keys from stdin, one a line, and prints
//! `key<TAB>node` for each.
//!
//! ```text
//! printf 'user:1\nuser:2\n' | cargo run -p sd-examples --example ring -- \
//!     --nodes 10.0.0.1:11211,10.0.0.2:11211:2 --mode ketama
//! ```
//!
//! Flags:
//! - `--nodes a:11211,b:11211:2`: node ids, comma-separated; a number after a second
//!   colon is the weight (default 1).
//! - `--mode crc32|xxh3|ketama|jump|rendezvous|maglev` (default `crc32`).
//! - `--vnodes N`: points per unit of weight for the ring modes (default 160).
//! - `--replicas N`: print N distinct owners per key, tab-separated (ring and
//!   rendezvous modes).

use std::error::Error;
use std::io::{BufRead, Write};

use sd_hashring::{DEFAULT_VNODES, HashKind, HashRing, Jump, Maglev, Node, Placement, Rendezvous};

pub(crate) struct Args {
    pub(crate) nodes: Vec<Node>,
    mode: String,
    vnodes: u32,
    replicas: usize,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ring: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        // --help, --version and clap's own usage errors print as clap formats them.
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap) => clap.exit(),
            Err(e) => return Err(e),
        },
    };
    let placement = build(&args)?;
    let out = std::io::BufWriter::new(std::io::stdout().lock());
    map_keys(&placement, &args, std::io::stdin().lock(), out)
}

/// Writes `key<TAB>node` for each line of `input`. Keys are bytes, split on `\n` (a
/// trailing `\r` is dropped), so keys that are not UTF-8 are placed as they are and
/// echoed unchanged.
pub(crate) fn map_keys(
    placement: &Built,
    args: &Args,
    mut input: impl BufRead,
    mut out: impl Write,
) -> Result<(), Box<dyn Error>> {
    let mut line = Vec::new();
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        let mut key = line.strip_suffix(b"\n").unwrap_or(&line);
        key = key.strip_suffix(b"\r").unwrap_or(key);
        out.write_all(key)?;
        for id in owners(placement, args, key) {
            write!(out, "\t{id}")?;
        }
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

/// The placements this command can run, behind the crate's one trait; the ring and
/// rendezvous keep their types for replica lookups.
pub(crate) enum Built {
    Ring(HashRing),
    Rendezvous(Rendezvous),
    Other(Box<dyn Placement>),
}

impl std::ops::Deref for Built {
    type Target = dyn Placement;
    fn deref(&self) -> &(dyn Placement + 'static) {
        match self {
            Built::Ring(r) => r,
            Built::Rendezvous(r) => r,
            Built::Other(p) => p.as_ref(),
        }
    }
}

pub(crate) fn build(args: &Args) -> Result<Built, Box<dyn Error>> {
    let nodes = args.nodes.clone();
    let ring = |hash| {
        HashRing::builder()
            .hash(hash)
            .vnodes(args.vnodes)
            .build(nodes.clone())
    };
    Ok(match args.mode.as_str() {
        "crc32" => Built::Ring(ring(HashKind::Crc32)?),
        "xxh3" => Built::Ring(ring(HashKind::Xxh3)?),
        "ketama" => Built::Ring(ring(HashKind::Ketama)?),
        "jump" => Built::Other(Box::new(Jump::new(nodes)?)),
        "rendezvous" => Built::Rendezvous(Rendezvous::new(nodes)?),
        "maglev" => Built::Other(Box::new(Maglev::new(nodes)?)),
        other => {
            return Err(format!(
                "unknown --mode `{other}`; use crc32, xxh3, ketama, jump, rendezvous or maglev"
            )
            .into());
        }
    })
}

fn owners<'a>(placement: &'a Built, args: &Args, key: &[u8]) -> Vec<&'a str> {
    match placement {
        Built::Ring(ring) if args.replicas > 1 => ring
            .owners(key, args.replicas)
            .map(|n| n.id().as_str())
            .collect(),
        Built::Rendezvous(r) if args.replicas > 1 => r
            .owners(key, args.replicas)
            .into_iter()
            .map(|n| n.id().as_str())
            .collect(),
        _ => placement
            .locate_bytes(key)
            .and_then(|i| placement.nodes().get(i))
            .map(|n| n.id().as_str())
            .into_iter()
            .collect(),
    }
}

/// The flags as given; [`parse_args`] turns them into [`Args`].
#[derive(Debug, clap::Parser)]
#[command(
    name = "ring",
    about = "Prints key<TAB>node for each key read from stdin"
)]
struct Cli {
    /// Node ids, comma-separated; a number after a second colon is the weight
    /// (`a:11211,b:11211:2`).
    #[arg(long)]
    nodes: String,
    /// crc32, xxh3, ketama, jump, rendezvous or maglev.
    #[arg(long, default_value = "crc32")]
    mode: String,
    /// Points per unit of weight for the ring modes.
    #[arg(long, default_value_t = DEFAULT_VNODES)]
    vnodes: u32,
    /// Print N distinct owners per key, tab-separated (ring and rendezvous modes).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

/// Parses the flags (without the program name).
pub(crate) fn parse_args(it: impl Iterator<Item = String>) -> Result<Args, Box<dyn Error>> {
    let cli = <Cli as clap::Parser>::try_parse_from(std::iter::once("ring".to_owned()).chain(it))?;
    let nodes = parse_nodes(&cli.nodes)?;
    if nodes.is_empty() {
        return Err("give the nodes with --nodes a:11211,b:11211:2".into());
    }
    Ok(Args {
        nodes,
        mode: cli.mode,
        vnodes: cli.vnodes,
        replicas: cli.replicas,
    })
}

/// `a:11211,b:11211:2` → `a:11211` (weight 1), `b:11211` (weight 2). A number after a
/// second colon outside brackets is the weight, so `[fd00::1]:6379:3` is the IPv6
/// node `[fd00::1]:6379` of weight 3 and `[fd00::1]:6379` has weight 1.
pub(crate) fn parse_nodes(spec: &str) -> Result<Vec<Node>, Box<dyn Error>> {
    spec.split(',')
        .map(|item| {
            let item = item.trim();
            let mut depth = 0i32;
            let colons: Vec<usize> = item
                .char_indices()
                .filter(|&(_, c)| {
                    match c {
                        '[' => depth += 1,
                        ']' => depth -= 1,
                        _ => {}
                    }
                    c == ':' && depth == 0
                })
                .map(|(i, _)| i)
                .collect();
            match colons[..] {
                [_, second] => {
                    let weight = item[second + 1..]
                        .parse()
                        .map_err(|e| format!("weight of `{item}`: {e}"))?;
                    Ok(Node::weighted(&item[..second], weight))
                }
                _ => Ok(Node::new(item)),
            }
        })
        .collect()
}
