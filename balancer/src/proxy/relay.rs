//! The relay: carries the bytes of a plain WebSocket tunnel once the
//! balancer holds both of its sockets alone (the client's handed over by
//! its [`Timed`](super::connections::Timed) stream, the backend's taken out
//! of Pingora's), on threads of its own, as many as the worker threads,
//! each waiting on an `epoll` of its own.
//!
//! A tunnel's message is a read and a write each way. On the runtime, each
//! of those also went through tokio's readiness, wakers and task
//! scheduling, which cost more user time than the system calls did, and a
//! bare tokio relay with nothing else came out below nginx on the WebSocket
//! bench (`bench/ws.sh`). Here an event leads straight to the read and the
//! write, as in nginx's event loop.
//!
//! The tunnel's task on the runtime stays: it hands the sockets over, waits
//! for the end (or for the grace period of a graceful stop to be over, and
//! then has the relay close the tunnel), and logs it. If its future is
//! dropped, the relay closes the tunnel: none is left behind.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::telemetry::access_log::Tunnel;

/// The most one read takes.
const READ_SIZE: usize = 16 * 1024;

/// Reads of one side in one turn at most: a side that always has more
/// (a bulk transfer) gets its next turn after the other tunnels' events.
const TURN: usize = 16;

/// Events taken from the `epoll` per wait.
const EVENTS: usize = 256;

/// A tunnel one side of which has ended closes after this long with
/// nothing either way (or after `idle_timeout`, if that is shorter): the
/// other side was told, and has had time to answer and end too.
pub const HALF_CLOSED: Duration = Duration::from_secs(5);

/// The token of a relay's own wake-up (its eventfd); a socket's token is
/// its tunnel's number times two, plus one for the backend's.
const WAKE: u64 = u64::MAX;

const CLIENT: usize = 0;
const BACKEND: usize = 1;

/// A tunnel handed to the relay.
pub struct Opening {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// What the client sent before the tunnel began, for the backend.
    pub up: Bytes,
    /// What the backend sent along with its `101`, for the client.
    pub down: Bytes,
    /// The tunnel closes after this long with nothing either way.
    pub idle: Duration,
}

/// How a tunnel ended.
pub struct Ended {
    pub tunnel: Tunnel,
    /// The backend's failure, when one ended the tunnel (a client's is
    /// just a close, if a ruder one).
    pub failure: Option<io::Error>,
}

/// The relay threads, started with the first tunnel.
pub struct Relays {
    threads: usize,
    started: OnceLock<Result<Vec<Arc<Relay>>, String>>,
}

/// Numbers the tunnels; the number also picks the relay.
static NEXT: AtomicU64 = AtomicU64::new(0);

impl Relays {
    pub fn new(threads: usize) -> Relays {
        Relays {
            threads: threads.max(1),
            started: OnceLock::new(),
        }
    }

    /// Has a relay carry the tunnel. The opening comes back when no relay
    /// could be started (said once, in the log): the caller carries it on
    /// the runtime then.
    pub fn carry(&self, opening: Opening) -> Result<Carried, Box<Opening>> {
        let relays = self.started.get_or_init(|| {
            let started = (0..self.threads).map(Relay::start).collect::<io::Result<Vec<_>>>();
            started.map_err(|e| {
                log::warn!("WebSocket relay threads could not be started ({e}); tunnels are carried on the worker threads");
                e.to_string()
            })
        });
        let Ok(relays) = relays else {
            return Err(Box::new(opening));
        };
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let relay = Arc::clone(&relays[id as usize % relays.len()]);
        let (tell, done) = oneshot::channel();
        relay.send(Command::Open(id, Box::new(opening), tell));
        Ok(Carried {
            id,
            relay,
            done,
            finished: false,
        })
    }
}

/// A tunnel the relay carries, seen from the task that handed it over.
pub struct Carried {
    id: u64,
    relay: Arc<Relay>,
    done: oneshot::Receiver<Ended>,
    finished: bool,
}

impl Carried {
    /// Waits for the tunnel's end; when `stop` comes first, has the relay
    /// close it (`stop`) and waits for that.
    pub async fn end(mut self, stop: impl Future<Output = ()>) -> Ended {
        tokio::pin!(stop);
        let ended = tokio::select! {
            biased;
            ended = &mut self.done => ended,
            () = &mut stop => {
                self.relay.send(Command::Close(self.id));
                (&mut self.done).await
            }
        };
        self.finished = true;
        // Dropped without a word: the relay's worker panicked (and said so).
        ended.unwrap_or(Ended {
            tunnel: Tunnel {
                closed_by: "error",
                bytes_up: 0,
                bytes_down: 0,
            },
            failure: None,
        })
    }
}

impl Drop for Carried {
    fn drop(&mut self) {
        if !self.finished {
            self.relay.send(Command::Close(self.id));
        }
    }
}

enum Command {
    Open(u64, Box<Opening>, oneshot::Sender<Ended>),
    Close(u64),
}

/// One relay thread's mailbox and `epoll`.
struct Relay {
    epoll: OwnedFd,
    /// An eventfd, written when a command is put in `inbox`.
    wake: OwnedFd,
    inbox: Mutex<Vec<Command>>,
}

impl Relay {
    fn start(index: usize) -> io::Result<Arc<Relay>> {
        // SAFETY: plain system calls; each descriptor returned is checked
        // and then owned.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let epoll = unsafe { OwnedFd::from_raw_fd(check(epoll)?) };
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        let wake = unsafe { OwnedFd::from_raw_fd(check(wake)?) };
        control(
            &epoll,
            libc::EPOLL_CTL_ADD,
            wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE,
        )?;
        let relay = Arc::new(Relay {
            epoll,
            wake,
            inbox: Mutex::new(Vec::new()),
        });
        let mine = Arc::clone(&relay);
        std::thread::Builder::new()
            .name(format!("ws-relay-{index}"))
            .spawn(move || loop {
                // A panic closes this relay's tunnels (their sockets go with
                // the worker's state), not the relay.
                let worker = Worker::new(Arc::clone(&mine));
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run())).is_err()
                {
                    log::error!("WebSocket relay {index} panicked; its tunnels were closed");
                }
            })?;
        Ok(relay)
    }

    fn send(&self, command: Command) {
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an owned eventfd. It
        // cannot fail short of its counter overflowing, which a wake-up
        // that is still due makes harmless.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

fn check(fd: RawFd) -> io::Result<RawFd> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

fn control(epoll: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: both descriptors are open; `event` outlives the call.
    check(unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) }).map(drop)
}

/// A relay thread's state.
struct Worker {
    relay: Arc<Relay>,
    tunnels: HashMap<u64, Open>,
    buf: Box<[u8]>,
    /// No tunnel can be idle for long enough to close before this.
    next_check: Option<Instant>,
    /// Tunnels with more to read than their last turn took.
    again: Vec<u64>,
}

/// An open tunnel: its two sides, [`CLIENT`] and [`BACKEND`].
///
/// Each direction ends on its own, as TCP's do: when one side is done
/// sending, what was read from it goes out to the other side, which is then
/// told (its sending half is shut down), and the other direction goes on
/// until that side is done too. Only then are the sockets closed, with
/// nothing unread in them: closing a socket with unread bytes would reset
/// the connection and throw away what it had not yet delivered.
struct Open {
    sides: [Side; 2],
    idle: Duration,
    /// When bytes last moved, read from either side or written to one.
    last: Instant,
    /// The first side to end, and the backend's failure if that was one:
    /// who closed the tunnel, as the log says it.
    first_end: Option<End>,
    done: oneshot::Sender<Ended>,
}

struct Side {
    socket: TcpStream,
    /// The socket may have bytes (or its end) to read: set by an event,
    /// cleared by a read that found the socket drained.
    readable: bool,
    /// The peer's end (or an error) has come: the socket is read until the
    /// read says so, however short the reads before it. (The end may come
    /// with the last bytes, in the same event; no event follows it.)
    hung_up: bool,
    /// The socket's read end was reached (its peer sends no more), or
    /// reading it failed.
    read_done: bool,
    /// Nothing more is written to the socket: its sending half was shut
    /// down once the other side ended and all it sent was out, or a write
    /// failed (what comes for it then is dropped).
    write_done: bool,
    /// Bytes from the other side that the socket had no room for yet; the
    /// other side is not read until they are written.
    outbox: Vec<u8>,
    sent: usize,
    /// Bytes read from this side and passed on.
    received: u64,
}

impl Side {
    fn new(socket: TcpStream, outbox: Bytes) -> Side {
        Side {
            socket,
            readable: true,
            hung_up: false,
            read_done: false,
            write_done: false,
            outbox: outbox.to_vec(),
            sent: 0,
            received: 0,
        }
    }

    /// Bytes waiting in `outbox`.
    fn waiting(&self) -> usize {
        self.outbox.len() - self.sent
    }

    /// A write failed: nothing more goes to this socket.
    fn write_failed(&mut self) {
        self.outbox = Vec::new();
        self.sent = 0;
        self.write_done = true;
    }

    /// Writes what waits; `false` when some still does (the socket is full).
    fn flush(&mut self) -> io::Result<bool> {
        while self.sent < self.outbox.len() {
            match (&self.socket).write(&self.outbox[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.outbox = Vec::new();
        self.sent = 0;
        Ok(true)
    }

    /// Sends `bytes` on, keeping what the socket has no room for.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut written = 0;
        while written < bytes.len() {
            match (&self.socket).write(&bytes[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if written < bytes.len() {
            self.outbox = bytes[written..].to_vec();
            self.sent = 0;
        }
        Ok(())
    }
}

/// When a tunnel silent since `last` closes: never, in effect, for an
/// `idle_timeout` too long to add to a time.
fn due(last: Instant, idle: Duration) -> Instant {
    last.checked_add(idle)
        .unwrap_or_else(|| last + Duration::from_secs(u32::MAX.into()))
}

/// Why a tunnel ends: who closed it, and the backend's failure if any.
type End = (&'static str, Option<io::Error>);

/// The end brought by `side`'s close or failure.
fn closed(side: usize, failure: Option<io::Error>) -> End {
    if side == CLIENT {
        ("client", None)
    } else {
        ("backend", failure)
    }
}

impl Open {
    /// Moves bytes both ways as far as the sockets allow, for a turn:
    /// `Ok(true)` when a side has more to read than a turn takes, `Err`
    /// when the tunnel is over (both sides have ended and all they sent is
    /// out, or could not be written).
    fn drive(&mut self, buf: &mut [u8], now: Instant) -> Result<bool, End> {
        let mut more = false;
        for from in [CLIENT, BACKEND] {
            let to = 1 - from;
            let mut reads = 0;
            loop {
                if !self.sides[to].outbox.is_empty() {
                    let waiting = self.sides[to].waiting();
                    let flushed = self.sides[to].flush();
                    if self.sides[to].waiting() < waiting {
                        self.last = now;
                    }
                    match flushed {
                        Ok(true) => {}
                        Ok(false) => break, // an event says when there is room
                        Err(e) => {
                            self.sides[to].write_failed();
                            self.note_end(to, Some(e), now);
                        }
                    }
                }
                if self.sides[from].read_done {
                    // All `from` sent is out: `to` is told it ends here.
                    let to = &mut self.sides[to];
                    if !to.write_done {
                        let _ = to.socket.shutdown(Shutdown::Write);
                        to.write_done = true;
                    }
                    break;
                }
                if !self.sides[from].readable {
                    break;
                }
                if reads == TURN {
                    more = true;
                    break;
                }
                reads += 1;
                match (&self.sides[from].socket).read(buf) {
                    Ok(0) => {
                        self.sides[from].read_done = true;
                        self.note_end(from, None, now);
                    }
                    Ok(n) => {
                        let side = &mut self.sides[from];
                        // A short read emptied the socket: the next bytes
                        // bring an event of their own.
                        side.readable = n == buf.len() || side.hung_up;
                        if self.sides[to].write_done {
                            // Dropped: `to` can take no more. Neither moved
                            // nor counted, they do not keep the tunnel open.
                            continue;
                        }
                        let to = &mut self.sides[to];
                        if let Err(e) = to.send(&buf[..n]) {
                            to.write_failed();
                            self.note_end(1 - from, Some(e), now);
                            continue;
                        }
                        self.last = now;
                        self.sides[from].received += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.sides[from].readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.sides[from].read_done = true;
                        self.note_end(from, Some(e), now);
                    }
                }
            }
        }
        // Over once both sides have ended and all they sent is out.
        let over = self.first_end.is_some()
            && self
                .sides
                .iter()
                .all(|s| s.read_done && s.outbox.is_empty());
        match self.first_end.take_if(|_| over) {
            Some(end) => Err(end),
            None => Ok(more),
        }
    }

    /// Notes `side`'s end (its close, or a failure reading or writing it),
    /// unless a side ended before. The other side's time to answer and end
    /// ([`HALF_CLOSED`]) starts now, however long the tunnel was silent.
    fn note_end(&mut self, side: usize, failure: Option<io::Error>, now: Instant) {
        self.last = now;
        if self.first_end.is_none() {
            self.first_end = Some(closed(side, failure));
        }
    }

    /// When the tunnel closes if nothing moves: after `idle_timeout`, or
    /// [`HALF_CLOSED`] once a side has ended.
    fn deadline(&self) -> Instant {
        let idle = match self.first_end {
            Some(_) => self.idle.min(HALF_CLOSED),
            None => self.idle,
        };
        due(self.last, idle)
    }

    fn finish(self, (closed_by, failure): End) {
        let [client, backend] = self.sides;
        let _ = backend.socket.shutdown(Shutdown::Write);
        let ended = Ended {
            tunnel: Tunnel {
                closed_by,
                bytes_up: client.received,
                bytes_down: backend.received,
            },
            failure,
        };
        // The sockets close here (closing takes them out of the `epoll`);
        // the task may have gone already.
        drop((client, backend));
        let _ = self.done.send(ended);
    }
}

impl Worker {
    fn new(relay: Arc<Relay>) -> Worker {
        Worker {
            relay,
            tunnels: HashMap::new(),
            buf: vec![0; READ_SIZE].into_boxed_slice(),
            next_check: None,
            again: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        loop {
            let timeout = match self.next_check {
                _ if !self.again.is_empty() => 0,
                None => -1,
                Some(at) => {
                    // Rounded up: waking before the deadline would only wait again.
                    let left = at.saturating_duration_since(Instant::now());
                    left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
                }
            };
            // SAFETY: `events` is a live buffer of EVENTS entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.relay.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    EVENTS as i32,
                    timeout,
                )
            };
            let now = Instant::now();
            for event in &events[..n.max(0) as usize] {
                let (token, flags) = (event.u64, event.events);
                if token == WAKE {
                    self.take_commands(now);
                    continue;
                }
                let (id, side) = (token >> 1, (token & 1) as usize);
                self.turn(id, Some((side, flags)), now);
            }
            for id in std::mem::take(&mut self.again) {
                self.turn(id, None, now);
            }
            if self.next_check.is_some_and(|at| at <= now) {
                self.close_idle(now);
            }
        }
    }

    /// Gives a tunnel its turn, after noting what an `event` (a side and
    /// its `epoll` flags) says, if one brought it.
    fn turn(&mut self, id: u64, event: Option<(usize, u32)>, now: Instant) {
        let Some(open) = self.tunnels.get_mut(&id) else {
            return; // closed since the event
        };
        if let Some((side, flags)) = event {
            let end = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
            let side = &mut open.sides[side];
            side.readable |= flags & (end | libc::EPOLLIN as u32) != 0;
            side.hung_up |= flags & end != 0;
        }
        match open.drive(&mut self.buf, now) {
            Ok(more) => {
                if open.first_end.is_some() {
                    // A side has ended: the deadline is nearer.
                    let deadline = open.deadline();
                    self.check_by(deadline);
                }
                if more && !self.again.contains(&id) {
                    self.again.push(id);
                }
            }
            Err(end) => self.close(id, end),
        }
    }

    fn take_commands(&mut self, now: Instant) {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from an owned eventfd;
        // resets its counter (nonblocking: nothing to read is fine).
        unsafe { libc::read(self.relay.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        let commands =
            std::mem::take(&mut *self.relay.inbox.lock().unwrap_or_else(|e| e.into_inner()));
        for command in commands {
            match command {
                Command::Open(id, opening, done) => self.open(id, *opening, done, now),
                Command::Close(id) => self.close(id, ("stop", None)),
            }
        }
    }

    fn open(&mut self, id: u64, opening: Opening, done: oneshot::Sender<Ended>, now: Instant) {
        let Opening {
            client,
            backend,
            up,
            down,
            idle,
        } = opening;
        let mut open = Open {
            sides: [Side::new(client, down), Side::new(backend, up)],
            idle,
            last: now,
            first_end: None,
            done,
        };
        // What came before the tunnel counts as its bytes, as it does on
        // the runtime.
        open.sides[CLIENT].received = open.sides[BACKEND].outbox.len() as u64;
        open.sides[BACKEND].received = open.sides[CLIENT].outbox.len() as u64;
        let flags = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        for side in [CLIENT, BACKEND] {
            let fd = open.sides[side].socket.as_raw_fd();
            if let Err(e) = control(
                &self.relay.epoll,
                libc::EPOLL_CTL_ADD,
                fd,
                flags,
                id << 1 | side as u64,
            ) {
                log::error!("WebSocket tunnel closed: its socket could not be watched: {e}");
                open.finish(("error", None));
                return;
            }
        }
        self.check_by(open.deadline());
        self.tunnels.insert(id, open);
        self.turn(id, None, now);
    }

    /// Has the tunnels checked for silence by `deadline` at the latest.
    fn check_by(&mut self, deadline: Instant) {
        self.next_check = Some(self.next_check.map_or(deadline, |at| at.min(deadline)));
    }

    fn close(&mut self, id: u64, end: End) {
        if let Some(open) = self.tunnels.remove(&id) {
            open.finish(end);
        }
        if self.tunnels.is_empty() {
            self.next_check = None;
        }
    }

    /// Closes the tunnels silent past their deadline (see
    /// [`Open::deadline`]), and notes when the next one could be. A tunnel
    /// a side of which had ended was closed by that side; one that only
    /// went silent, by `idle_timeout`.
    fn close_idle(&mut self, now: Instant) {
        let idle: Vec<u64> = self
            .tunnels
            .iter()
            .filter(|(_, open)| open.deadline() <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            let first_end = self.tunnels.get_mut(&id).and_then(|o| o.first_end.take());
            self.close(id, first_end.unwrap_or(("idle", None)));
        }
        self.next_check = self.tunnels.values().map(Open::deadline).min();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The two ends of a loopback TCP connection: (far, near), the near one
    /// nonblocking, as the relay is given it; the far one with a read
    /// timeout, so that a test that would hang fails instead.
    fn connection() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (near, _) = listener.accept().unwrap();
        near.set_nonblocking(true).unwrap();
        far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (far, near)
    }

    fn read_exactly(socket: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        socket.read_exact(&mut got).unwrap();
        got
    }

    fn closed(socket: &mut TcpStream) -> bool {
        matches!(socket.read(&mut [0; 16]), Ok(0))
    }

    /// `first` closes; `then` is told (its read ends) and closes too: how
    /// the tunnel ended.
    async fn first_closes(first: TcpStream, mut then: TcpStream, carried: Carried) -> Ended {
        drop(first);
        assert!(closed(&mut then), "the other side is told");
        drop(then);
        carried.end(std::future::pending()).await
    }

    /// A tunnel carried by a relay of `threads`, its early bytes through:
    /// (the client's far end, the backend's far end, the handle).
    fn tunnel(threads: usize, idle: Duration) -> (TcpStream, TcpStream, Carried) {
        let (mut client, client_near) = connection();
        let (mut backend, backend_near) = connection();
        let opening = Opening {
            client: client_near,
            backend: backend_near,
            up: Bytes::from_static(b"sent early up"),
            down: Bytes::from_static(b"sent early down"),
            idle,
        };
        let Ok(carried) = Relays::new(threads).carry(opening) else {
            panic!("no relay thread");
        };
        assert_eq!(read_exactly(&mut backend, 13), b"sent early up");
        assert_eq!(read_exactly(&mut client, 15), b"sent early down");
        (client, backend, carried)
    }

    #[tokio::test]
    async fn the_early_bytes_go_first_then_both_ways_and_a_dropped_handle_closes_the_tunnel() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::from_secs(60));
        client.write_all(b"ping").unwrap();
        assert_eq!(read_exactly(&mut backend, 4), b"ping");
        backend.write_all(b"pong").unwrap();
        assert_eq!(read_exactly(&mut client, 4), b"pong");
        // The handover's task gone (its future dropped): the relay closes both.
        drop(carried);
        assert!(closed(&mut client));
        assert!(closed(&mut backend));
    }

    #[tokio::test]
    async fn a_tunnel_says_who_closed_it_and_counts_the_bytes_each_way() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::from_secs(60));
        client.write_all(b"12345").unwrap();
        read_exactly(&mut backend, 5);
        let ended = first_closes(backend, client, carried).await;
        assert_eq!(ended.tunnel.closed_by, "backend");
        let bytes = (ended.tunnel.bytes_up, ended.tunnel.bytes_down);
        assert_eq!(bytes, (13 + 5, 15));
        assert!(ended.failure.is_none(), "a close, not a failure");
    }

    #[tokio::test]
    async fn a_side_that_sends_and_closes_at_once_has_its_bytes_delivered_and_the_tunnel_closed() {
        for round in 0..20 {
            let (client, backend, carried) = tunnel(1, Duration::from_secs(60));
            // Turn about: the backend's last answer, the client's last message.
            let (mut closing, mut other, by) = match round % 2 {
                0 => (backend, client, "backend"),
                _ => (client, backend, "client"),
            };
            // The bytes and the end arrive together, before the relay looks.
            closing.write_all(b"bye").unwrap();
            drop(closing);
            assert_eq!(read_exactly(&mut other, 3), b"bye");
            assert!(closed(&mut other), "told at once, not after idle_timeout");
            drop(other);
            let ended = carried.end(std::future::pending()).await;
            assert_eq!(ended.tunnel.closed_by, by);
            let bytes = (ended.tunnel.bytes_up, ended.tunnel.bytes_down);
            assert_eq!(
                bytes,
                if by == "backend" {
                    (13, 15 + 3)
                } else {
                    (13 + 3, 15)
                }
            );
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_sending_still_gets_all_that_was_read_for_it() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::from_secs(60));
        // More than the sockets between hold: the relay is left holding some.
        const TOTAL: u64 = 64 << 20;
        let written = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&written);
        let sender = std::thread::spawn(move || {
            let chunk = vec![7u8; 64 * 1024];
            while count.load(Ordering::Relaxed) < TOTAL {
                if backend.write_all(&chunk).is_err() {
                    break;
                }
                count.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        });
        // The client reads nothing until the backend's writes block: then
        // the sockets are full, and the relay holds bytes it could not pass
        // on (it reads the backend only once it has none left for the client).
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut seen, mut still) = (0, 0);
        while still < 3 {
            assert!(
                Instant::now() < deadline,
                "the backend's writes never blocked"
            );
            std::thread::sleep(Duration::from_millis(100));
            let now = written.load(Ordering::Relaxed);
            still = if now == seen { still + 1 } else { 0 };
            seen = now;
        }
        assert!(seen < TOTAL, "the backend's writes blocked, not ended");
        // Then it says it is done sending (as after a WebSocket close frame)
        // and reads what comes.
        client.shutdown(Shutdown::Write).unwrap();
        let mut received = 0u64;
        let mut buf = vec![0; 64 * 1024];
        loop {
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received += n as u64,
                Err(e) => panic!("after {received} bytes: {e}"),
            }
        }
        let ended = carried.end(std::future::pending()).await;
        assert_eq!(ended.tunnel.closed_by, "client");
        assert_eq!(
            received + 15,
            ended.tunnel.bytes_down,
            "every byte read from the backend reached the client"
        );
        sender.join().unwrap();
    }

    #[tokio::test]
    async fn silence_for_idle_timeout_closes_a_tunnel_and_traffic_puts_it_off() {
        let idle = Duration::from_secs(2);
        let started = Instant::now();
        let (mut client, mut backend, carried) = tunnel(1, idle);
        // Traffic every 300 ms for 3 s keeps it open past idle_timeout (a
        // pause of up to 1.7 s, a busy machine's, is still within it).
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(300));
            client.write_all(b"x").unwrap();
            read_exactly(&mut backend, 1);
        }
        let ended = carried.end(std::future::pending()).await;
        assert_eq!(ended.tunnel.closed_by, "idle");
        assert!(started.elapsed() >= Duration::from_secs(3) + idle);
        assert!(closed(&mut client));
        assert!(closed(&mut backend));
    }

    #[tokio::test]
    async fn an_idle_timeout_too_long_to_add_to_a_time_means_never() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::MAX);
        client.write_all(b"still here").unwrap();
        assert_eq!(read_exactly(&mut backend, 10), b"still here");
        let ended = first_closes(client, backend, carried).await;
        assert_eq!(ended.tunnel.closed_by, "client");
    }

    #[tokio::test]
    async fn a_client_that_stops_sending_still_gets_the_answer_that_comes_after() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::from_secs(60));
        // As a WebSocket client may, after its close frame.
        client.write_all(b"close").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_exactly(&mut backend, 5), b"close");
        assert!(closed(&mut backend), "the backend is told the client ended");
        std::thread::sleep(Duration::from_millis(100));
        backend.write_all(b"bye").unwrap();
        drop(backend);
        assert_eq!(read_exactly(&mut client, 3), b"bye");
        assert!(closed(&mut client));
        let ended = carried.end(std::future::pending()).await;
        assert_eq!(ended.tunnel.closed_by, "client");
        let bytes = (ended.tunnel.bytes_up, ended.tunnel.bytes_down);
        assert_eq!(bytes, (13 + 5, 15 + 3));
    }

    #[tokio::test]
    async fn a_backend_that_ends_while_the_client_still_sends_has_all_it_sent_delivered() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::from_secs(60));
        const TOTAL: usize = 64 * 1024;
        // The client sends all along, as fast as it can: the relay always
        // has some of it still to read.
        let mut sending = client.try_clone().unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let sender = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                if sending.write_all(&[1u8; 16 * 1024]).is_err() {
                    break;
                }
                sent += 16 * 1024;
            }
            sent
        });
        // The backend sends its last bytes, says it is done, and reads what
        // still comes until the client is done too.
        let (ended_tx, ended_rx) = std::sync::mpsc::channel();
        let answering = std::thread::spawn(move || {
            backend.write_all(&[9u8; TOTAL]).unwrap();
            backend.shutdown(Shutdown::Write).unwrap();
            ended_tx.send(()).unwrap();
            let mut seen = 0u64;
            let mut buf = vec![0; 64 * 1024];
            loop {
                match backend.read(&mut buf) {
                    Ok(0) => return Ok(seen),
                    Ok(n) => seen += n as u64,
                    Err(e) => return Err(format!("after {seen} bytes: {e}")),
                }
            }
        });
        // The client reads only once the backend's end has been relayed.
        ended_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut received = 0usize;
        let mut buf = vec![0; 64 * 1024];
        let outcome = loop {
            match client.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => received += n,
                Err(e) => break Err(e),
            }
        };
        stop.store(true, Ordering::Relaxed);
        let sent = sender.join().unwrap();
        assert!(
            outcome.is_ok() && received == TOTAL,
            "the client got {received} of {TOTAL} bytes, then {outcome:?}"
        );
        drop(client);
        let seen = answering.join().unwrap().unwrap();
        assert_eq!(seen, sent, "all the client sent reached the backend");
        let ended = carried.end(std::future::pending()).await;
        assert_eq!(ended.tunnel.closed_by, "backend");
        let bytes = (ended.tunnel.bytes_up, ended.tunnel.bytes_down);
        assert_eq!(bytes, (13 + sent, 15 + TOTAL as u64));
    }

    #[tokio::test]
    async fn a_side_that_ended_has_half_closed_to_answer_and_end_too() {
        let (client, mut backend, carried) = tunnel(1, Duration::from_secs(3600));
        let started = Instant::now();
        drop(client);
        assert!(closed(&mut backend));
        // The backend neither answers nor closes: the tunnel closes anyway.
        let ended = carried.end(std::future::pending()).await;
        assert_eq!(ended.tunnel.closed_by, "client");
        assert!(started.elapsed() >= HALF_CLOSED);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not after idle_timeout"
        );
    }

    #[tokio::test]
    async fn a_side_that_ends_after_a_long_silence_still_gives_the_other_time_to_answer() {
        let (mut client, mut backend, carried) = tunnel(1, Duration::from_secs(60));
        std::thread::sleep(HALF_CLOSED + Duration::from_millis(500));
        backend.shutdown(Shutdown::Write).unwrap();
        assert!(closed(&mut client), "the client is told");
        std::thread::sleep(Duration::from_millis(100));
        client.write_all(b"bye").unwrap();
        assert_eq!(read_exactly(&mut backend, 3), b"bye");
        let ended = first_closes(client, backend, carried).await;
        assert_eq!(ended.tunnel.closed_by, "backend");
        let bytes = (ended.tunnel.bytes_up, ended.tunnel.bytes_down);
        assert_eq!(bytes, (13 + 3, 15));
    }

    #[tokio::test]
    async fn a_client_that_keeps_sending_to_a_backend_gone_does_not_keep_the_tunnel_open() {
        let (mut client, backend, carried) = tunnel(1, Duration::from_secs(60));
        // The backend resets its connection (SO_LINGER 0, then close).
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        set_option(&backend, libc::SO_LINGER, linger);
        drop(backend);
        let reset = Instant::now();
        // The client ignores the end it is told of and sends on, for longer
        // than HALF_CLOSED; what it sends has nowhere to go.
        let sender = std::thread::spawn(move || {
            while reset.elapsed() < HALF_CLOSED * 3 {
                if client.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let ended = carried.end(std::future::pending()).await;
        let took = reset.elapsed();
        assert_eq!(ended.tunnel.closed_by, "backend");
        assert!(took < HALF_CLOSED * 2, "closed {took:?} after the reset");
        assert_eq!(ended.tunnel.bytes_up, 13, "dropped bytes are not counted");
        sender.join().unwrap();
    }

    #[tokio::test]
    async fn bytes_still_going_out_to_a_slow_client_keep_the_tunnel_open() {
        // Small buffers on the client's connection: the relay holds most of
        // one read from the backend, and passes it on as the client reads.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        set_option(&listener, libc::SO_RCVBUF, 2048 as libc::c_int);
        let client_near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut client, _) = listener.accept().unwrap();
        set_option(&client_near, libc::SO_SNDBUF, 2048 as libc::c_int);
        client_near.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (mut backend, backend_near) = connection();
        let idle = Duration::from_millis(1500);
        let opening = Opening {
            client: client_near,
            backend: backend_near,
            up: Bytes::new(),
            down: Bytes::new(),
            idle,
        };
        let Ok(carried) = Relays::new(1).carry(opening) else {
            panic!("no relay thread");
        };
        const ANSWER: usize = 16 * 1024;
        backend.write_all(&[5u8; ANSWER]).unwrap();
        // 256 bytes every 100 ms: longer than idle_timeout in all, with the
        // relay's bytes moving all along.
        let started = Instant::now();
        let mut received = 0;
        let mut buf = [0u8; 256];
        while received < ANSWER {
            match client.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received += n,
                Err(e) => panic!("after {received} bytes: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(received, ANSWER, "cut after {:?}", started.elapsed());
        assert!(
            started.elapsed() > idle,
            "the answer took longer than idle_timeout"
        );
        drop(carried);
    }

    /// Sets a socket-level option of `socket` to `value`.
    fn set_option<T>(socket: &impl AsRawFd, option: libc::c_int, value: T) {
        // SAFETY: an open socket, and a live value of the size given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "setsockopt: {}", io::Error::last_os_error());
    }

    #[tokio::test]
    async fn the_stop_closes_a_tunnel() {
        let (mut client, mut backend, carried) = tunnel(2, Duration::from_secs(60));
        let ended = carried.end(std::future::ready(())).await;
        assert_eq!(ended.tunnel.closed_by, "stop");
        assert!(closed(&mut client));
        assert!(closed(&mut backend));
    }
}
