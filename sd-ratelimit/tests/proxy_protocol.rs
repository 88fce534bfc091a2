//! Reading a PROXY header from a stream consumes exactly the header.
#![cfg(feature = "tokio")]
#![allow(clippy::unwrap_used)] // Tests may unwrap.

use sd_ratelimit::Error;
use sd_ratelimit::client_ip::read_proxy_header;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
