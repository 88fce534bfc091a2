//! Ports for test servers: drawn from below the kernel's ephemeral range and reserved
//! across test processes, so a server killed and started again finds its port free.

use std::fs;
use std::net::TcpListener;
use std::sync::Mutex;

use crate::error::{Error, Result, io_err};
use crate::process::root_dir;

/// A free TCP port on the loopback interface, reserved for this test process.
///
/// Fault tests kill a server and start it again on the same port. A port the kernel
/// handed out (`bind` to port 0) could meanwhile go to another test's server, or to an
/// outgoing connection, and the restarted server would then answer on someone else's
/// port, or a Sentinel would turn another test's server into its replica. So ports come
/// from below the kernel's ephemeral range (which `bind(0)` and `connect` draw from),
/// and each one is reserved by an exclusive lock on a file `<root>/ports/<port>`, held
/// until this process exits (the kernel then releases it, whatever the exit).
pub(crate) fn free_port() -> Result<u16> {
    static HELD: Mutex<Vec<fs::File>> = Mutex::new(Vec::new());
    let dir = root_dir()?.join("ports");
    fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let (low, high) = reservable_ports();
    let span = u64::from(high - low);
    for attempt in 0..2_000u64 {
        let pick = crate::nonce().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ attempt;
        let port = low + (pick % span) as u16;
        let path = dir.join(port.to_string());
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(format!("opening {}", path.display())))?;
        // Locked by another test process (or by this one, for another server): taken.
        if file.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(file);
            return Ok(port);
        }
        // In use by a process outside the testkit: dropping the file releases the lock.
    }
    Err(Error::State {
        action: "reserve a free port",
        reason: "2,000 ports tried below the ephemeral range were all taken",
    })
}

/// The ports `free_port` draws from: from 10000 up to the kernel's ephemeral range, or
/// above it when that leaves too few, or 10000-65535 when neither side has room.
fn reservable_ports() -> (u16, u16) {
    const LOW: u16 = 10_000;
    const ENOUGH: u16 = 4_096;
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let bounds: Vec<u16> = range
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match bounds[..] {
        [first, _] if first >= LOW + ENOUGH => (LOW, first),
        [_, last] if last <= u16::MAX - ENOUGH => (last + 1, u16::MAX),
        _ => (LOW, u16::MAX),
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::process::{Command, Stdio};

    use super::*;

    /// Entry point of the child process of the test below: reserves ports, prints them,
    /// and holds them until its stdin closes.
    #[test]
    #[ignore = "run as a child process by ports_stay_reserved_until_their_holder_exits"]
    fn hold_ports_in_a_child() {
        if std::env::var_os("SD_TESTKIT_PORT_CHILD").is_none() {
            return;
        }
        for _ in 0..10 {
            println!("port {}", free_port().unwrap());
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    }

    fn lockable(port: u16) -> bool {
        let path = root_dir().unwrap().join("ports").join(port.to_string());
        fs::File::open(path).unwrap().try_lock().is_ok()
    }

    #[test]
    fn ports_stay_reserved_until_their_holder_exits() {
        use std::io::BufRead;
        let (low, high) = reservable_ports();
        let mine: Vec<u16> = (0..10).map(|_| free_port().unwrap()).collect();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "ports::tests::hold_ports_in_a_child"])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env("SD_TESTKIT_PORT_CHILD", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = io::BufReader::new(child.stdout.take().unwrap()).lines();
        let theirs: Vec<u16> = out
            .by_ref()
            .map_while(|l| l.ok())
            // The harness prints the test's name on the line of the first port.
            .filter_map(|l| l.rsplit_once("port ").and_then(|(_, p)| p.parse().ok()))
            .take(10)
            .collect();
        assert_eq!(theirs.len(), 10, "the child printed its ports");
        let mut all: Vec<u16> = mine.iter().chain(&theirs).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            all.len(),
            20,
            "no port went to two servers: {mine:?} {theirs:?}"
        );
        assert!(
            all.iter().all(|p| (low..high).contains(p)),
            "{all:?} in {low}..{high}"
        );
        // Held while their holders live: neither this process nor any other gets them.
        assert!(mine.iter().chain(&theirs).all(|&p| !lockable(p)));
        drop(child.stdin.take());
        out.for_each(drop);
        assert!(child.wait().unwrap().success());
        // The child exited: its ports are free again, ours are still held.
        assert!(theirs.iter().all(|&p| lockable(p)));
        assert!(mine.iter().all(|&p| !lockable(p)));
    }
}
