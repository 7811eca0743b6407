//! The HTTP listener's own defences: at most so many connections at once, and a request must
//! arrive whole within a time limit — a client that sends its headers byte by byte (slowloris)
//! is cut off instead of holding a connection for ever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

/// Wraps an acceptor: holds one of `max_connections` permits per open connection (accepting
/// waits while none is free), and guards each connection with [`RequestDeadline`].
pub struct GuardedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
    request_read_timeout: Duration,
}

impl<A: Acceptor> GuardedAcceptor<A> {
    pub fn new(inner: A, max_connections: usize, request_read_timeout: Duration) -> Self {
        GuardedAcceptor {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            request_read_timeout,
        }
    }
}

impl<A: Acceptor> Acceptor for GuardedAcceptor<A> {
    type Io = RequestDeadline<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| io::Error::other("the connection limit is closed"))?;
        let (io, local, remote, scheme) = self.inner.accept().await?;
        let io = RequestDeadline {
            io,
            _permit: permit,
            limit: self.request_read_timeout,
            deadline: None,
        };
        Ok((io, local, remote, scheme))
    }
}

/// A connection on which a request, once its first byte has arrived, must be read before the
/// server starts answering, within `limit`. Writing (the answer) clears the deadline; the next
/// request's first byte sets a new one. An idle connection is left to the server's idle timeout.
pub struct RequestDeadline<Io> {
    io: Io,
    _permit: OwnedSemaphorePermit,
    limit: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<Io: AsyncRead + Unpin> AsyncRead for RequestDeadline<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request was not received in time",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(())))
            && buf.filled().len() > before
            && self.deadline.is_none()
        {
            let mut deadline = Box::pin(tokio::time::sleep(self.limit));
            // Registers this task to be woken when the time is up, even if no byte comes.
            let _ = deadline.as_mut().poll(cx);
            self.deadline = Some(deadline);
        }
        read
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for RequestDeadline<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.deadline = None;
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.deadline = None;
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
