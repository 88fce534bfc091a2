//! etcd, single member.

use std::ffi::OsString;
use std::sync::Arc;

use crate::error::Result;
use crate::http;
use crate::process::{self, Process, Spec};

/// An `etcd` single-member cluster owned by the test.
#[derive(Debug)]
pub struct EtcdServer {
    process: Process,
}

impl EtcdServer {
    /// Starts etcd and waits until `/health` says it is healthy.
    pub fn start() -> Result<Self> {
        crate::retry_on_port_clash(Self::spawn)
    }

    fn spawn() -> Result<Self> {
        let program = process::find_binary("etcd", "etcd-server", &[])?;
        let port = crate::ports::free_port()?;
        let peer = crate::ports::free_port()?;
        let dir = process::server_dir("etcd")?;
        let data = dir.join("data");
        let client_url = format!("http://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args: Vec<OsString> = vec!["--data-dir".into(), data.clone().into()];
        for (flag, value) in [
            ("--name", "sd-test".to_owned()),
            ("--listen-client-urls", client_url.clone()),
            ("--advertise-client-urls", client_url),
            ("--listen-peer-urls", peer_url.clone()),
            ("--initial-advertise-peer-urls", peer_url.clone()),
            ("--initial-cluster", format!("sd-test={peer_url}")),
            ("--logger", "zap".to_owned()),
            ("--log-level", "warn".to_owned()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        let ready = Arc::new(|port| {
            Ok(http::request(port, "GET", "/health", None)
                .is_ok_and(|(status, body)| status == 200 && body.contains("\"true\"")))
        });
        let process = Process::start(Spec {
            // etcd creates its data directory itself and refuses one it did not make.
            reset: Arc::new(|data| {
                process::empty_dir(data)?;
                std::fs::remove_dir(data)
                    .map_err(crate::error::io_err(format!("removing {}", data.display())))
            }),
            ..Spec::new("etcd", program, args, port, dir, data, ready)
        })?;
        Ok(EtcdServer { process })
    }

    /// `http://127.0.0.1:PORT`, the client endpoint.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.process.port())
    }
}

crate::fault_controls!(EtcdServer);
