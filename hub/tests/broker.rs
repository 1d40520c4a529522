//! Crate tests of the embedded broker: every socket it accepts has TCP_NODELAY
//! (rumqttd does not set it; without it the loopback hop adds a ~40 ms floor).

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_internal_broker_accepts_sockets_with_tcp_nodelay() {
    use std::os::fd::{BorrowedFd, RawFd};

    let (broker, _link) = fieldsync_hub::broker::start(8).await.unwrap();
    let client = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    let ours = client.local_addr().unwrap();
    // rumqttd's end of this connection is a descriptor of this process: the
    // socket whose peer is our client.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut found = None;
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<RawFd>().ok())
            else {
                continue;
            };
            // SAFETY: borrowed for two calls; a closed descriptor makes them fail.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let socket = socket2::SockRef::from(&fd);
            let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
            if peer == Some(ours) {
                found = Some(socket.tcp_nodelay().unwrap());
            }
        }
        if let Some(nodelay) = found {
            assert!(
                nodelay,
                "the broker's accepted socket has Nagle's algorithm on"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the broker never accepted the connection"
        );
        tokio::task::yield_now().await;
    }
}
