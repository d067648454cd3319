//! Picking loopback ports for new nodes.
//!
//! Ports are drawn at random below the kernel's ephemeral range, so that the
//! outgoing connections of replicas and sentinels (which take ephemeral
//! ports) never sit on the port of a node that is down and about to be
//! restarted. A candidate is bound once to check it is free; the race between
//! that check and `redis-server` binding it is handled by the caller, which
//! retries with a new port when the server reports the address in use.
//!
//! A port handed out stays its node's, so that a killed node can be
//! restarted on it: this process never hands it out again, and on Linux a
//! [`Reservation`], which its topology holds, keeps every other process
//! using this crate (test binaries run side by side) from taking it. The
//! reservation is an abstract Unix socket named after the port, which the
//! kernel releases however the process ends.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::Range;
use std::sync::Mutex;

use rand::Rng;

/// Ports below this are left to well-known services (6379 among them).
const LOWEST: u16 = 10_000;
/// Where Linux's ephemeral range starts by default.
const DEFAULT_EPHEMERAL_START: u16 = 32_768;
/// How many candidates one pick tries before giving up.
const CANDIDATES: usize = 200;

/// The range candidate ports are drawn from.
fn candidate_range() -> Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START);
    if ephemeral_start > LOWEST + 1_000 {
        LOWEST..ephemeral_start
    } else {
        // An unusually wide ephemeral range: stay clear of well-known ports
        // and rely on the retry when a port turns out to be taken.
        LOWEST..u16::MAX
    }
}

/// Ports already handed out in this process. They are never handed out
/// again, so two topologies of one test binary cannot race for a port, and
/// a killed node's port stays its own for a restart.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A loopback port that was free a moment ago, never handed out by this
/// process before and reserved by no other, with its reservation; or
/// `None` if none was found.
pub(crate) fn pick_free_port() -> Option<(u16, Reservation)> {
    let range = candidate_range();
    let mut rng = rand::rng();
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let (port, reservation) = (0..CANDIDATES)
        .map(|_| rng.random_range(range.clone()))
        .filter(|port| !handed_out.contains(port))
        .find_map(|port| {
            let reservation = reserve(port)?;
            TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                .is_ok()
                .then_some((port, reservation))
        })?;
    handed_out.insert(port);
    Some((port, reservation))
}

/// Holds a port against the other processes on the machine (its network
/// namespace) that use this crate, for as long as it lives.
#[derive(Debug)]
pub(crate) struct Reservation {
    _socket: Option<std::os::unix::net::UnixListener>,
}

/// Reserves `port`, or `None` if another reservation holds it. Where
/// reserving cannot work (not Linux, or a socket refused for another
/// reason), the port is handed out unreserved, guarded only by the bind
/// check and the caller's retry: a restart can then find it taken.
fn reserve(port: u16) -> Option<Reservation> {
    #[cfg(target_os = "linux")]
    {
        use std::os::linux::net::SocketAddrExt as _;
        use std::os::unix::net::{SocketAddr, UnixListener};
        let name = format!("redis-topology-port-{port}");
        if let Ok(addr) = SocketAddr::from_abstract_name(name.as_bytes()) {
            match UnixListener::bind_addr(&addr) {
                Ok(socket) => {
                    return Some(Reservation {
                        _socket: Some(socket),
                    });
                }
                Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => return None,
                Err(_) => {}
            }
        }
    }
    let _ = port;
    Some(Reservation { _socket: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picked_ports_are_free_never_well_known_and_never_repeated() {
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            let (port, _reservation) = pick_free_port().expect("some port is free");
            assert!(port >= LOWEST);
            assert_ne!(port, 6379);
            assert!(seen.insert(port), "{port} handed out twice");
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("the picked port can be bound");
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_port_handed_out_is_reserved_from_every_process() {
        let (port, _reservation) = pick_free_port().expect("some port is free");
        // The same name bound again: what another process would meet.
        assert!(reserve(port).is_none(), "{port} reserved twice");
        // A port nobody holds (other processes may hold some).
        let (other, held) = loop {
            let candidate = rand::rng().random_range(candidate_range());
            let handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
            if handed_out.contains(&candidate) {
                continue;
            }
            if let Some(held) = reserve(candidate) {
                break (candidate, held);
            }
        };
        assert!(reserve(other).is_none());
        drop(held);
        assert!(reserve(other).is_some(), "released with its reservation");
    }

    #[test]
    fn candidates_lie_above_well_known_ports() {
        let range = candidate_range();
        assert!(range.start >= LOWEST && range.start < range.end);
    }
}
