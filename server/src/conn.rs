//! Connection-level protections: connections counted per client address,
//! and answers that must make progress or the connection goes.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use hyper::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::api::App;

/// The group a client address is counted and throttled in: the address
/// itself for IPv4, its /64 network for IPv6 (one host usually has a
/// whole /64 to pick addresses from).
pub(crate) fn address_group(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(network))
            }
        },
    }
}

/// The client's address group as text, for login throttling: from the
/// trusted proxy's header if one is configured (its last address: the one
/// the proxy itself saw), else the peer's.
pub(crate) fn client_group(app: &App, peer: IpAddr, headers: &HeaderMap) -> String {
    let forwarded = app
        .client_address_header
        .as_ref()
        .and_then(|name| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok());
    address_group(forwarded.unwrap_or(peer)).to_string()
}

/// Open connections per client address group, capped.
#[derive(Debug)]
pub(crate) struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
    /// The most per group; 0 for no cap.
    cap: usize,
}

/// One counted connection; uncounted when dropped.
pub(crate) struct Counted {
    registry: Arc<PerAddress>,
    group: IpAddr,
}

impl PerAddress {
    pub(crate) fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::default(),
            cap,
        })
    }

    /// Counts a connection from `addr`, or `None` if its group is full.
    pub(crate) fn admit(self: &Arc<Self>, addr: IpAddr) -> Option<Counted> {
        let group = address_group(addr);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(group).or_default();
        if self.cap > 0 && *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(Counted {
            registry: Arc::clone(self),
            group,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.registry.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.group) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.group);
            }
        }
    }
}

/// A stream whose writes fail with `TimedOut` once one has made no
/// progress for `timeout`: a client that stops reading its answers (or
/// pipelines requests and never reads) loses its connection, and the
/// buffers held for it, instead of keeping them for ever.
pub(crate) struct SendTimeout<S> {
    inner: S,
    timeout: Duration,
    /// Armed while a write waits for the client to read.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> SendTimeout<S> {
    pub(crate) fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// What a write that returned `pending` means: wait, unless the
    /// stall has lasted the timeout.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stalled.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing of the answer in time",
        )))
    }

    fn progress<T>(
        &mut self,
        written: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match written {
            Poll::Pending => self.stall(cx),
            done => {
                self.stalled = None;
                done
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SendTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SendTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(written, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(flushed, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn ipv6_clients_are_grouped_by_network() {
        let group = |text: &str| address_group(text.parse().unwrap()).to_string();
        assert_eq!(group("192.0.2.7"), "192.0.2.7");
        assert_eq!(group("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::");
        assert_eq!(group("2001:db8:1:2:ffff::1"), "2001:db8:1:2::");
        assert_eq!(group("::ffff:192.0.2.7"), "192.0.2.7");
    }

    #[test]
    fn connections_are_capped_per_group_and_released() {
        let registry = PerAddress::new(2);
        let addr: IpAddr = "2001:db8::1".parse().unwrap();
        let neighbour: IpAddr = "2001:db8::2".parse().unwrap();
        let first = registry.admit(addr).unwrap();
        let _second = registry.admit(neighbour).unwrap();
        assert!(registry.admit(addr).is_none(), "the /64 is full");
        assert!(registry.admit("192.0.2.1".parse().unwrap()).is_some());
        drop(first);
        assert!(registry.admit(addr).is_some());
        assert!(PerAddress::new(0).admit(addr).is_some(), "0: no cap");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_times_out() {
        // A pipe whose reader reads nothing: writes stall once it is full.
        let (client, server) = tokio::io::duplex(64);
        let mut stream = SendTimeout::new(server, Duration::from_secs(10));
        stream.write_all(&[0; 64]).await.unwrap();
        let error = stream.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        drop(client);

        // A slow reader that makes progress every 6 s resets the clock:
        // 18 s of writing, no stall of 10 s.
        let (mut client, server) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut buf = [0; 64];
            let mut total = 0;
            while total < 256 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                total += client.read(&mut buf).await.unwrap();
            }
            total
        });
        let mut stream = SendTimeout::new(server, Duration::from_secs(10));
        stream.write_all(&[1; 256]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 256);
    }
}
