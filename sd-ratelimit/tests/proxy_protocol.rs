//! Reading a PROXY header from a stream consumes exactly the header; the PROXY listener
//! hands on connections with the client's address and drops the ones without a valid
//! header, without a silent peer holding up the others.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use std::time::Duration;

use sd_ratelimit::Error;
use sd_ratelimit::client_ip::{ProxyListener, read_proxy_header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn reads_v1_and_v2_and_leaves_the_payload() {
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 192, 0, 2, 1, 198, 51, 100, 1, 0xdc, 0x04, 0x01, 0xbb,
    ]);
    for header in [
        b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n".to_vec(),
        v2,
    ] {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&header).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let h = read_proxy_header(&mut server).await.unwrap();
        assert_eq!(h.source, Some("192.0.2.1:56324".parse().unwrap()));
        let mut rest = [0u8; 16];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"GET / HTTP/1.1\r\n");
    }
}

#[tokio::test]
async fn refuses_a_connection_without_the_header() {
    let (mut client, mut server) = tokio::io::duplex(1024);
    client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    assert!(matches!(
        read_proxy_header(&mut server).await,
        Err(Error::ProxyProtocol { .. })
    ));
    // A peer that hangs up mid-header is an I/O error, not a panic.
    let (mut client, mut server) = tokio::io::duplex(1024);
    client.write_all(b"PROXY TCP4 1.2").await.unwrap();
    drop(client);
    assert!(matches!(
        read_proxy_header(&mut server).await,
        Err(Error::Io { .. })
    ));
}

/// Connects to `addr` and writes `bytes`; the stream stays open.
async fn client(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_hands_on_clients_and_drops_bad_headers() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut listener = ProxyListener::new(tcp, Duration::from_millis(100)).unwrap();
    let addr = listener.local_addr().unwrap();
    let guard = Duration::from_secs(30); // hang guard only

    // A silent peer and a peer without a header come first; neither holds up the next.
    let _silent = client(addr, b"").await;
    let _plain = client(addr, b"GET / HTTP/1.1\r\n\r\n").await;
    let _valid = client(
        addr,
        b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nhello",
    )
    .await;
    let (mut stream, who) = tokio::time::timeout(guard, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who, "192.0.2.1:56324".parse().unwrap());
    let mut payload = [0u8; 5];
    stream.read_exact(&mut payload).await.unwrap();
    assert_eq!(
        &payload, b"hello",
        "the header is stripped, the payload kept"
    );

    // A v2 LOCAL header (the proxy's own health check) names no client: the peer is it.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let health = client(addr, &local).await;
    let (_, who) = tokio::time::timeout(guard, listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(who, health.local_addr().unwrap());

    // Both bad connections are dropped and counted once their header fails or times out.
    tokio::time::timeout(guard, async {
        while listener.rejected() < 2 {
            let _probe = client(addr, b"PROXY UNKNOWN\r\n").await;
            listener.accept().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert_eq!(listener.rejected(), 2);
    assert!(matches!(
        ProxyListener::new(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            Duration::ZERO
        ),
        Err(Error::InvalidConfig {
            field: "header_timeout",
            ..
        })
    ));
}
