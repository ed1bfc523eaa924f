//! Ports for servers that stop and start again on the same address.

use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port, free for TCP and UDP now, below the kernel's range for
/// outgoing connections (32768 and up on Linux). A server that stops and
/// starts again on it finds it free: a port the kernel picked (`:0`) is
/// from that range, and any test's outgoing connection could take it
/// meanwhile.
pub fn restartable_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread by process, so test binaries running at once rarely try the
    // same ports; each try takes the next.
    let base = std::process::id().wrapping_mul(7919);
    for _ in 0..2_000 {
        let n = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = 20_000 + (n % 12_000) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 20000 and 32000");
}
