//! A minimal HTTP/1.1 client for health checks and etcd's JSON gateway.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::error::{Error, Result, io_err};

/// Sends one request to `127.0.0.1:port` and returns (status, body).
pub fn request(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .map_err(io_err(format!("connecting to port {port}")))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io_err("setting a read timeout"))?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(io_err("writing an http request"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(io_err("reading an http response"))?;
    let bad = || Error::Protocol {
        server: "http",
        detail: format!(
            "malformed response {:?}",
            &response[..response.len().min(200)]
        ),
    };
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let (head, payload) = response.split_once("\r\n\r\n").ok_or_else(bad)?;
    let payload = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(payload).ok_or_else(bad)?
    } else {
        payload.to_owned()
    };
    Ok((status, payload))
}

fn dechunk(mut payload: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = payload.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        payload = rest.get(size + 2..)?;
    }
}
